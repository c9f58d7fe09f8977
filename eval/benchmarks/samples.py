"""The benchmark-independent sample record and the file helpers every reader shares.

A reader turns a benchmark's raw files into a list of :class:`Sample`; a scorer takes that list
and the model's answers. Everything here is pure Python: images are opened only when
:meth:`Sample.load_image` is called, so listing a benchmark stays cheap.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import string
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The standard harness suffixes (LLaVA-1.5 / lmms-eval), see shared/design/EVAL.md.
SHORT_ANSWER_SUFFIX = "\nAnswer the question using a single word or phrase."
MULTIPLE_CHOICE_SUFFIX = "\nAnswer with the option's letter from the given choices directly."

IMAGE_EXTENSIONS = (".jpg", ".png", ".jpeg", ".JPG", ".PNG", ".JPEG")

ImageSource = Path | Callable[[], Any] | None


class BenchmarkFileError(ValueError):
    """A benchmark file is missing or malformed; the message names the file and line or key.

    Example:
        >>> str(BenchmarkFileError("pope.json", "bad JSON", line=3))
        'pope.json:3: bad JSON'
    """

    def __init__(self, path: str | Path, reason: str, *, line: int | None = None, key: str | None = None):
        self.path, self.reason, self.line, self.key = str(path), reason, line, key
        where = self.path if line is None else f"{self.path}:{line}"
        if key is not None:
            where += f" [key {key!r}]"
        super().__init__(f"{where}: {reason}")


@dataclass
class Sample:
    """One benchmark question, with the exact prompt the model is given.

    ``answers`` holds every gold answer (ten for TextVQA, one elsewhere); ``choices`` holds the
    option texts in letter order for multiple-choice benchmarks. ``group`` ties together
    questions that are scored as a unit (MME's two questions per image, MMBench's circular
    copies); ``limit`` in ``load_benchmark`` keeps groups whole.

    Example:
        >>> s = Sample("gqa", "1", "Is it red?", "Is it red?" + SHORT_ANSWER_SUFFIX, ["yes"])
        >>> s.answer, s.group_key
        ('yes', '1')
    """

    benchmark: str
    sample_id: str
    question: str
    prompt: str
    answers: list[str]
    image: ImageSource = None
    choices: list[str] = field(default_factory=list)
    group: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def answer(self) -> str:
        """The first (for most benchmarks the only) gold answer."""
        return self.answers[0]

    @property
    def group_key(self) -> str:
        return self.group if self.group is not None else self.sample_id

    def load_image(self):
        """Open the image as an RGB ``PIL.Image`` (``None`` for text-only samples).

        Example:
            >>> Sample("x", "1", "q", "q", ["a"]).load_image() is None
            True
        """
        if self.image is None:
            return None
        if callable(self.image):
            return self.image().convert("RGB")
        from PIL import Image  # lazy: listing samples must not need pillow

        with Image.open(self.image) as img:
            return img.convert("RGB")

    def to_record(self) -> dict[str, Any]:
        """A JSON-serialisable summary for per-sample result files (embedded images omitted).

        Example:
            >>> Sample("x", "1", "q", "q?", ["a"]).to_record()["prompt"]
            'q?'
        """
        image = str(self.image) if isinstance(self.image, Path) else None
        keys = ("benchmark", "sample_id", "question", "prompt", "answers", "choices", "group", "metadata")
        return {"image": image, **{k: getattr(self, k) for k in keys}}


def letters(n: int) -> list[str]:
    """The first ``n`` option letters.

    Example:
        >>> letters(3)
        ['A', 'B', 'C']
    """
    if n > 26:
        raise ValueError(f"at most 26 options can be lettered, got {n}")
    return list(string.ascii_uppercase[:n])


def format_choices(choices: Sequence[str]) -> str:
    """Options one per line as ``A. text`` (the LLaVA / lmms-eval layout).

    Example:
        >>> format_choices(["cat", "dog"])
        'A. cat\\nB. dog'
    """
    return "\n".join(f"{letter}. {text}" for letter, text in zip(letters(len(choices)), choices))


def apply_limit(samples: list[Sample], limit: int | None) -> list[Sample]:
    """Keep the samples of the first ``limit`` groups (a group is never split).

    Example:
        >>> s = [Sample("x", str(i), "q", "q", ["a"], group=str(i // 2)) for i in range(6)]
        >>> [x.sample_id for x in apply_limit(s, 2)]
        ['0', '1', '2', '3']
    """
    if limit is None:
        return samples
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    kept: set[str] = set()
    for s in samples:
        if len(kept) == limit:
            break
        kept.add(s.group_key)
    # Copies of a group can sit far later in the file (MMBench), so filter the whole list.
    return [s for s in samples if s.group_key in kept]


def align_predictions(samples: Sequence[Sample], predictions: Mapping[str, str] | Sequence[str]) -> list[str]:
    """Predictions in sample order, from a dict keyed by ``sample_id`` or an aligned list.

    Example:
        >>> align_predictions([Sample("x", "7", "q", "q", ["a"])], {"7": "a", "8": "b"})
        ['a']
    """
    if not samples:
        raise ValueError("no samples to score")
    if isinstance(predictions, Mapping):
        missing = [s.sample_id for s in samples if s.sample_id not in predictions]
        if missing:
            raise ValueError(f"{len(missing)} samples have no prediction, e.g. {missing[:5]}")
        out = [predictions[s.sample_id] for s in samples]
    else:
        if len(predictions) != len(samples):
            raise ValueError(f"got {len(predictions)} predictions for {len(samples)} samples")
        out = list(predictions)
    return ["" if p is None else str(p) for p in out]


def read_json(path: Path) -> Any:
    """Parse a JSON file, raising :class:`BenchmarkFileError` with the failing line."""
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise BenchmarkFileError(path, f"invalid JSON ({e.msg})", line=e.lineno) from None


def iter_json_lines(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, object)`` for each non-blank line of a JSON-lines file."""
    for lineno, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise BenchmarkFileError(path, f"invalid JSON line ({e.msg})", line=lineno) from None
        if not isinstance(obj, dict):
            raise BenchmarkFileError(path, "expected a JSON object", line=lineno)
        yield lineno, obj


def require(
    record: Mapping[str, Any], key: str, path: Path, *, line: int | None = None, item: str | None = None
):
    """``record[key]``, or a :class:`BenchmarkFileError` naming the file, the line or item, and the key.

    Example:
        >>> try:
        ...     require({"a": 1}, "b", Path("f.json"), item="q7")
        ... except BenchmarkFileError as e:
        ...     print(e)
        f.json [key 'q7']: missing field 'b'
    """
    if not isinstance(record, Mapping):
        raise BenchmarkFileError(
            path, f"expected an object, got {type(record).__name__}", line=line, key=item
        )
    if key not in record:
        raise BenchmarkFileError(path, f"missing field {key!r}", line=line, key=item)
    return record[key]


def find_image(folder: Path, name: str) -> Path | None:
    """``folder/name`` if it exists, else ``folder/name<ext>`` for the usual image extensions."""
    candidate = folder / name
    if candidate.is_file():
        return candidate
    for ext in IMAGE_EXTENSIONS:
        candidate = folder / f"{name}{ext}"
        if candidate.is_file():
            return candidate
    return None


def locate_image(
    folder: Path,
    name: str,
    source: Path,
    *,
    check: bool = True,
    line: int | None = None,
    item: str | None = None,
) -> Path:
    """The image ``name`` in ``folder``; with ``check``, a missing one is an error on ``source``.

    Checking costs one ``stat`` per sample; pass ``check=False`` to trust the file list.
    """
    if not check:
        return folder / name
    found = find_image(folder, name)
    if found is None:
        raise BenchmarkFileError(source, f"image {name!r} not found in {folder}", line=line, key=item)
    return found


def base64_image_loader(data: str, source: Path | None = None, line: int | None = None) -> Callable[[], Any]:
    """A zero-argument callable decoding a base64 image into a ``PIL.Image`` when called.

    Decoding is deferred so a large TSV can be listed without decoding every image; a bad image
    is then reported against ``source``/``line`` when it is first loaded.

    Example:
        >>> load = base64_image_loader("bm90IGFuIGltYWdl", Path("x.tsv"), 2)  # b"not an image"
        >>> try:
        ...     load()
        ... except BenchmarkFileError as e:
        ...     print(e)
        x.tsv:2: undecodable image (cannot identify image file)
    """

    def load():
        from PIL import Image, UnidentifiedImageError

        try:
            return Image.open(io.BytesIO(base64.b64decode(data, validate=True)))
        except (binascii.Error, UnidentifiedImageError, ValueError) as e:
            reason = "cannot identify image file" if isinstance(e, UnidentifiedImageError) else "bad base64"
            raise BenchmarkFileError(
                source or "<base64 image>", f"undecodable image ({reason})", line=line
            ) from None

    return load


def read_text(path: Path) -> str:
    """A file's UTF-8 text; a missing or undecodable file is a :class:`BenchmarkFileError`."""
    if not path.is_file():
        raise BenchmarkFileError(path, "file not found")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise BenchmarkFileError(path, f"not UTF-8 text ({e.reason} at byte {e.start})") from None
