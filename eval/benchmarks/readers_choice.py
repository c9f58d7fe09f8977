"""Readers for the multiple-choice benchmarks: ScienceQA-IMG, MMBench dev (TSV) and SEED-Bench."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

from .samples import (
    MULTIPLE_CHOICE_SUFFIX,
    BenchmarkFileError,
    ImageSource,
    Sample,
    base64_image_loader,
    format_choices,
    letters,
    locate_image,
    read_json,
    require,
)

MMBENCH_FILE = "mmbench_dev_20230712.tsv"
MMBENCH_COLUMNS = ("index", "question", "A", "B", "answer", "image")
# Rows with index >= 1e6 are circular copies: index % 1e6 is the question they rotate.
CIRCULAR_OFFSET = 1_000_000
SEED_FILE = "SEED-Bench.json"


def choice_prompt(question: str, choices: list[str], suffix: str, context: str = "") -> str:
    """``context`` line (if any), question, lettered options, suffix: the LLaVA / lmms-eval layout.

    Example:
        >>> choice_prompt("Which?", ["cat", "dog"], "", context="Context: pets")
        'Context: pets\\nWhich?\\nA. cat\\nB. dog'
    """
    head = f"{context}\n" if context else ""
    return f"{head}{question}\n{format_choices(choices)}{suffix}"


def make_choice_sample(
    benchmark: str,
    sample_id,
    question: str,
    choices: list[str],
    answer: str | None,
    image: ImageSource,
    suffix: str,
    *,
    context: str = "",
    group: str | None = None,
    metadata: dict | None = None,
) -> Sample:
    """A multiple-choice sample whose gold answer is an option letter."""
    return Sample(
        benchmark=benchmark,
        sample_id=str(sample_id),
        question=question,
        prompt=choice_prompt(question, choices, suffix, context),
        answers=[answer] if answer else [],
        image=image,
        choices=choices,
        group=group,
        metadata=metadata or {},
    )


def read_scienceqa(
    data_dir: str | Path,
    *,
    split: str = "test",
    image_dir: str | Path | None = None,
    suffix: str = MULTIPLE_CHOICE_SUFFIX,
    check_images: bool = True,
) -> list[Sample]:
    """Read ScienceQA-IMG: the ``split`` questions of ``problems.json`` that have an image.

    The split's ids come from ``pid_splits.json`` when present (else each problem's ``split``);
    images are ``<split>/<pid>/image.png`` under ``image_dir``, ``data_dir/images`` or
    ``data_dir``. A non-empty hint becomes a ``Context:`` line, as in lmms-eval.

    Example:
        >>> samples = read_scienceqa("data/scienceqa")  # doctest: +SKIP
        >>> samples[0].prompt.splitlines()[-1]  # doctest: +SKIP
        "Answer with the option's letter from the given choices directly."
    """
    data_dir = Path(data_dir)
    path = data_dir / "problems.json"
    problems = read_json(path)
    if not isinstance(problems, dict):
        raise BenchmarkFileError(path, "expected an object mapping problem id -> problem")
    root = Path(image_dir) if image_dir is not None else _first_dir(data_dir / "images", data_dir)
    samples = []
    for pid in _scienceqa_ids(data_dir, problems, split):
        rec = problems[pid]
        if not require(rec, "image", path, item=pid):
            continue
        choices = [str(c) for c in require(rec, "choices", path, item=pid)]
        answer = require(rec, "answer", path, item=pid)
        if not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise BenchmarkFileError(path, f"answer {answer!r} is not an index into choices", key=pid)
        image = locate_image(root / split / pid, str(rec["image"]), path, check=check_images, item=pid)
        hint = str(rec.get("hint") or "").strip()
        meta = {k: rec.get(k) for k in ("subject", "grade", "topic", "category")}
        question = str(require(rec, "question", path, item=pid)).strip()
        context = f"Context: {hint}" if hint else ""
        gold = letters(len(choices))[answer]
        samples.append(
            make_choice_sample(
                "scienceqa", pid, question, choices, gold, image, suffix, context=context, metadata=meta
            )
        )
    return samples


def _scienceqa_ids(data_dir: Path, problems: dict, split: str) -> list[str]:
    splits_path = data_dir / "pid_splits.json"
    if not splits_path.exists():
        return [pid for pid, rec in problems.items() if isinstance(rec, dict) and rec.get("split") == split]
    pids = [str(p) for p in require(read_json(splits_path), split, splits_path)]
    for pid in pids:
        if pid not in problems:
            raise BenchmarkFileError(splits_path, "problem id not in problems.json", key=pid)
    return pids


def _first_dir(*candidates: Path) -> Path:
    return next((c for c in candidates if c.is_dir()), candidates[-1])


def read_mmbench(
    data_dir: str | Path,
    *,
    tsv_file: str = MMBENCH_FILE,
    circular: bool = True,
    suffix: str = MULTIPLE_CHOICE_SUFFIX,
) -> list[Sample]:
    """Read the MMBench dev TSV (base64 images); circular copies share their source's ``group``.

    ``circular=False`` keeps only the original questions (index < 1e6). An image field holding
    just a row index (newer TSVs deduplicate images that way) points at that row's image.

    Example:
        >>> samples = read_mmbench("data/mmbench")  # doctest: +SKIP
        >>> {s.group for s in samples if s.metadata["index"] % 1_000_000 == 7}  # doctest: +SKIP
        {'7'}
    """
    path = Path(data_dir) / tsv_file
    rows = _read_tsv(path, MMBENCH_COLUMNS)
    images = {int(row["index"]): row["image"] for _, row in rows if not row["image"].isdigit()}
    samples = []
    for line, row in rows:
        index = int(row["index"])
        if index >= CIRCULAR_OFFSET and not circular:
            continue
        image = row["image"]
        if image.isdigit():
            if int(image) not in images:
                raise BenchmarkFileError(path, f"image refers to row {image}, which has no image", line=line)
            image = images[int(image)]
        choices = _mmbench_choices(row)
        if len(choices) < 2:
            raise BenchmarkFileError(path, "a question needs options A and B", line=line)
        answer = _missing_to_empty(row["answer"]).strip()
        if answer and answer not in letters(len(choices)):
            raise BenchmarkFileError(path, f"answer {answer!r} is not one of the options", line=line)
        meta = {
            "index": index,
            "category": row.get("category", ""),
            "l2_category": row.get("l2-category", ""),
            "circular_copy": index >= CIRCULAR_OFFSET,
        }
        loader = base64_image_loader(image, path, line)
        hint = _missing_to_empty(row.get("hint", "")).strip()
        question = row["question"].strip()
        group = str(index % CIRCULAR_OFFSET)
        samples.append(
            make_choice_sample(
                "mmbench",
                index,
                question,
                choices,
                answer,
                loader,
                suffix,
                context=hint,
                group=group,
                metadata=meta,
            )
        )
    return samples


def _read_tsv(path: Path, required: tuple[str, ...]) -> list[tuple[int, dict[str, str]]]:
    if not path.is_file():
        raise BenchmarkFileError(path, "file not found")
    # Base64 images are far longer than csv's default 128 KiB field limit.
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    out = []
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t")
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise BenchmarkFileError(path, f"header lacks column(s) {missing}", line=1)
        for row in reader:
            # DictReader files surplus fields under None and pads short rows with None.
            if None in row or None in row.values():
                raise BenchmarkFileError(
                    path, f"expected {len(reader.fieldnames)} tab-separated fields", line=reader.line_num
                )
            if not row["index"].strip().isdigit():
                raise BenchmarkFileError(
                    path, f"index {row['index']!r} is not an integer", line=reader.line_num
                )
            out.append((reader.line_num, row))
    return out


def _missing_to_empty(value: str | None) -> str:
    # pandas writes NaN as an empty field or the text "nan".
    return "" if value is None or value.strip().lower() == "nan" else value


def _mmbench_choices(row: dict[str, str]) -> list[str]:
    choices = []
    for letter in "ABCDEFGHI":
        text = _missing_to_empty(row.get(letter)).strip()
        if not text:
            break
        choices.append(text)
    return choices


def read_seedbench(
    data_dir: str | Path,
    *,
    json_file: str = SEED_FILE,
    image_dir: str | Path | None = None,
    suffix: str = MULTIPLE_CHOICE_SUFFIX,
    check_images: bool = True,
) -> list[Sample]:
    """Read the image questions (``data_type == "image"``) of ``SEED-Bench.json``.

    Images are ``SEED-Bench-image/<data_id>`` (an extension is added when ``data_id`` has none).

    Example:
        >>> samples = read_seedbench("data/seed")  # doctest: +SKIP
        >>> samples[0].choices  # doctest: +SKIP
        ['a cat', 'a dog', 'a bird', 'a fish']
    """
    data_dir = Path(data_dir)
    images = Path(image_dir) if image_dir is not None else data_dir / "SEED-Bench-image"
    path = data_dir / json_file
    data = read_json(path)
    questions = require(data, "questions", path)
    if not isinstance(questions, list):
        raise BenchmarkFileError(path, "expected a list of questions", key="questions")
    type_names = {v: k for k, v in (data.get("question_type") or {}).items()}
    samples = []
    for i, rec in enumerate(questions):
        item = f"questions[{i}]"
        if require(rec, "data_type", path, item=item) != "image":
            continue
        choices = [str(require(rec, f"choice_{c}", path, item=item)) for c in "abcd"]
        answer = str(require(rec, "answer", path, item=item)).strip()
        if answer not in letters(4):
            raise BenchmarkFileError(path, f"answer {answer!r} is not A-D", key=item)
        data_id = str(require(rec, "data_id", path, item=item))
        image = locate_image(images, data_id, path, check=check_images, item=item)
        type_id = rec.get("question_type_id")
        meta = {"question_type_id": type_id, "question_type": type_names.get(type_id)}
        qid = require(rec, "question_id", path, item=item)
        question = str(require(rec, "question", path, item=item)).strip()
        samples.append(
            make_choice_sample("seedbench", qid, question, choices, answer, image, suffix, metadata=meta)
        )
    return samples
