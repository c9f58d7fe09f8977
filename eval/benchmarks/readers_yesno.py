"""Readers for the yes/no hallucination and perception benchmarks: POPE and MME."""

from __future__ import annotations

from pathlib import Path

from .samples import (
    IMAGE_EXTENSIONS,
    SHORT_ANSWER_SUFFIX,
    BenchmarkFileError,
    ImageSource,
    Sample,
    iter_json_lines,
    locate_image,
    read_text,
    require,
)

POPE_SPLITS = ("random", "popular", "adversarial")

MME_PERCEPTION = (
    "existence",
    "count",
    "position",
    "color",
    "posters",
    "celebrity",
    "scene",
    "landmark",
    "artwork",
    "OCR",
)
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
# subtask -> "perception" | "cognition": the two totals MME papers report.
MME_SUBTASKS = {**dict.fromkeys(MME_PERCEPTION, "perception"), **dict.fromkeys(MME_COGNITION, "cognition")}


def make_pope_sample(
    split: str, question_id, question: str, label: str, image: ImageSource, suffix: str = SHORT_ANSWER_SUFFIX
) -> Sample:
    """One POPE sample; ids carry the split because question ids repeat across splits."""
    return Sample(
        benchmark="pope",
        sample_id=f"{split}/{question_id}",
        question=question,
        prompt=question + suffix,
        answers=[label],
        image=image,
        metadata={"split": split, "question_id": question_id},
    )


def read_pope(
    data_dir: str | Path,
    *,
    splits: tuple[str, ...] = POPE_SPLITS,
    image_dir: str | Path | None = None,
    suffix: str = SHORT_ANSWER_SUFFIX,
    check_images: bool = True,
) -> list[Sample]:
    """Read POPE's ``coco_pope_<split>.json`` files (JSON lines despite the name).

    The files may sit in ``data_dir`` or ``data_dir/coco`` (LLaVA's layout); images default to
    ``data_dir/val2014`` when that folder exists, else ``data_dir``.

    Example:
        >>> samples = read_pope("data/pope", splits=("random",))  # doctest: +SKIP
        >>> samples[0].sample_id, samples[0].answer  # doctest: +SKIP
        ('random/1', 'yes')
    """
    data_dir = Path(data_dir)
    images = Path(image_dir) if image_dir is not None else _default_pope_images(data_dir)
    samples = []
    for split in splits:
        if split not in POPE_SPLITS:
            raise ValueError(f"unknown POPE split {split!r}; expected some of {POPE_SPLITS}")
        path = _pope_file(data_dir, split)
        for line, rec in iter_json_lines(path):
            qid = require(rec, "question_id", path, line=line)
            label = str(require(rec, "label", path, line=line)).strip().lower()
            if label not in ("yes", "no"):
                raise BenchmarkFileError(path, f"label must be yes or no, got {rec['label']!r}", line=line)
            name = str(require(rec, "image", path, line=line))
            image = locate_image(images, name, path, check=check_images, line=line)
            question = str(require(rec, "text", path, line=line)).strip()
            samples.append(make_pope_sample(split, qid, question, label, image, suffix))
    return samples


def _pope_file(data_dir: Path, split: str) -> Path:
    name = f"coco_pope_{split}.json"
    nested = data_dir / "coco" / name
    return nested if not (data_dir / name).exists() and nested.exists() else data_dir / name


def _default_pope_images(data_dir: Path) -> Path:
    coco = data_dir / "val2014"
    return coco if coco.is_dir() else data_dir


def make_mme_sample(
    subtask: str, image_key: str, index: int, question: str, answer: str, image: ImageSource, suffix: str
) -> Sample:
    """One MME question; the two questions on an image share ``group`` for acc+."""
    return Sample(
        benchmark="mme",
        sample_id=f"{subtask}/{image_key}/{index}",
        question=question,
        prompt=question + suffix,
        answers=[answer],
        image=image,
        group=f"{subtask}/{image_key}",
        metadata={
            "subtask": subtask,
            "category": MME_SUBTASKS.get(subtask, "unknown"),
            "image_key": image_key,
        },
    )


def read_mme(
    data_dir: str | Path,
    *,
    subtasks: tuple[str, ...] | None = None,
    suffix: str = SHORT_ANSWER_SUFFIX,
    check_images: bool = True,
) -> list[Sample]:
    """Read MME's 14 subtasks from ``MME_Benchmark_release_version`` (or its parent folder).

    Each subtask uses one of two layouts: ``images/`` + ``questions_answers_YN/<stem>.txt``, or
    ``<stem>.jpg|png`` beside ``<stem>.txt``. Each txt line is ``question<TAB>Yes|No``.

    Example:
        >>> samples = read_mme("data/MME", subtasks=("OCR",))  # doctest: +SKIP
        >>> samples[0].metadata["category"]  # doctest: +SKIP
        'perception'
    """
    root = Path(data_dir)
    if (root / "MME_Benchmark_release_version").is_dir():
        root = root / "MME_Benchmark_release_version"
    samples = []
    for subtask in subtasks if subtasks is not None else tuple(MME_SUBTASKS):
        if subtask not in MME_SUBTASKS:
            raise ValueError(f"unknown MME subtask {subtask!r}; expected some of {tuple(MME_SUBTASKS)}")
        samples.extend(_read_mme_subtask(root / subtask, subtask, suffix, check_images))
    return samples


def _read_mme_subtask(folder: Path, subtask: str, suffix: str, check_images: bool) -> list[Sample]:
    if not folder.is_dir():
        raise BenchmarkFileError(folder, f"MME subtask folder {subtask!r} not found")
    qa_dir = folder / "questions_answers_YN"
    txt_dir, img_dir = (qa_dir, folder / "images") if qa_dir.is_dir() else (folder, folder)
    txt_files = sorted(txt_dir.glob("*.txt"))
    if not txt_files:
        raise BenchmarkFileError(txt_dir, f"no question files (*.txt) for MME subtask {subtask!r}")
    # One directory listing instead of a stat per extension per image.
    listing = (
        {p.stem: p for p in img_dir.iterdir() if p.suffix in IMAGE_EXTENSIONS} if img_dir.is_dir() else {}
    )
    samples = []
    for txt in txt_files:
        image = listing.get(txt.stem)
        if image is None:
            if check_images:
                raise BenchmarkFileError(txt, f"no image named {txt.stem}.jpg/.png in {img_dir}")
            image = img_dir / f"{txt.stem}.jpg"
        for index, (question, answer) in enumerate(_read_mme_txt(txt)):
            samples.append(make_mme_sample(subtask, txt.stem, index, question, answer, image, suffix))
    return samples


def _read_mme_txt(path: Path) -> list[tuple[str, str]]:
    pairs = []
    for line, text in enumerate(read_text(path).splitlines(), start=1):
        if not text.strip():
            continue
        # rsplit: the answer is the last field, a stray tab inside a question must not break it.
        parts = text.rsplit("\t", 1)
        if len(parts) != 2:
            raise BenchmarkFileError(path, "expected 'question<TAB>Yes|No'", line=line)
        answer = parts[1].strip().lower()
        if answer not in ("yes", "no"):
            raise BenchmarkFileError(path, f"answer must be Yes or No, got {parts[1]!r}", line=line)
        pairs.append((parts[0].strip(), answer))
    if not pairs:
        raise BenchmarkFileError(path, "no questions in file")
    return pairs
