"""Readers for the short-answer VQA benchmarks: GQA testdev-balanced and TextVQA val."""

from __future__ import annotations

from pathlib import Path

from .samples import (
    SHORT_ANSWER_SUFFIX,
    BenchmarkFileError,
    ImageSource,
    Sample,
    locate_image,
    read_json,
    require,
)

GQA_QUESTIONS = "testdev_balanced_questions.json"
TEXTVQA_QUESTIONS = "TextVQA_0.5.1_val.json"


def make_gqa_sample(question_id, question: str, answer: str, image: ImageSource, suffix: str) -> Sample:
    """One GQA question (a single gold answer)."""
    return Sample(
        benchmark="gqa",
        sample_id=str(question_id),
        question=question,
        prompt=question + suffix,
        answers=[answer],
        image=image,
    )


def read_gqa(
    data_dir: str | Path,
    *,
    questions_file: str = GQA_QUESTIONS,
    image_dir: str | Path | None = None,
    suffix: str = SHORT_ANSWER_SUFFIX,
    check_images: bool = True,
) -> list[Sample]:
    """Read GQA ``testdev_balanced_questions.json`` (question id -> record); images in ``images/``.

    Example:
        >>> samples = read_gqa("data/gqa", check_images=False)  # doctest: +SKIP
        >>> samples[0].prompt.endswith("single word or phrase.")  # doctest: +SKIP
        True
    """
    data_dir = Path(data_dir)
    images = Path(image_dir) if image_dir is not None else data_dir / "images"
    path = data_dir / questions_file
    data = read_json(path)
    if not isinstance(data, dict):
        raise BenchmarkFileError(path, "expected an object mapping question id -> question")
    samples = []
    for qid, rec in data.items():
        image_id = str(require(rec, "imageId", path, item=qid))
        image = locate_image(images, f"{image_id}.jpg", path, check=check_images, item=qid)
        question = str(require(rec, "question", path, item=qid)).strip()
        answer = str(require(rec, "answer", path, item=qid))
        samples.append(make_gqa_sample(qid, question, answer, image, suffix))
    return samples


def textvqa_prompt(question: str, ocr_tokens: list[str] | None, suffix: str) -> str:
    """The TextVQA prompt; with OCR tokens, LLaVA-1.5's ``Reference OCR token:`` line is added.

    Example:
        >>> textvqa_prompt("what brand?", ["nikon", "d90"], "")
        'what brand?\\nReference OCR token: nikon, d90'
    """
    ocr = "" if ocr_tokens is None else "\nReference OCR token: " + ", ".join(ocr_tokens)
    return question + ocr + suffix


def make_textvqa_sample(
    question_id,
    question: str,
    answers: list[str],
    ocr_tokens: list[str],
    image: ImageSource,
    ocr: bool,
    suffix: str,
) -> Sample:
    """One TextVQA question with its ten human answers."""
    return Sample(
        benchmark="textvqa",
        sample_id=str(question_id),
        question=question,
        prompt=textvqa_prompt(question, ocr_tokens if ocr else None, suffix),
        answers=answers,
        image=image,
        metadata={"ocr_tokens": ocr_tokens, "ocr_in_prompt": ocr},
    )


def read_textvqa(
    data_dir: str | Path,
    *,
    ocr: bool = False,
    questions_file: str = TEXTVQA_QUESTIONS,
    image_dir: str | Path | None = None,
    suffix: str = SHORT_ANSWER_SUFFIX,
    check_images: bool = True,
) -> list[Sample]:
    """Read TextVQA ``TextVQA_0.5.1_val.json``; images in ``train_images/`` (val uses train images).

    ``ocr=True`` adds the ``Reference OCR token: ...`` line that LLaVA-1.5 numbers are reported
    with; the default leaves it out (lmms-eval's default).

    Example:
        >>> samples = read_textvqa("data/textvqa", ocr=True)  # doctest: +SKIP
        >>> "Reference OCR token:" in samples[0].prompt  # doctest: +SKIP
        True
    """
    data_dir = Path(data_dir)
    images = Path(image_dir) if image_dir is not None else data_dir / "train_images"
    path = data_dir / questions_file
    items = require(read_json(path), "data", path)
    if not isinstance(items, list):
        raise BenchmarkFileError(path, "expected a list of questions", key="data")
    samples = []
    for i, rec in enumerate(items):
        item = f"data[{i}]"
        qid = require(rec, "question_id", path, item=item)
        answers = require(rec, "answers", path, item=item)
        if not isinstance(answers, list) or not answers:
            raise BenchmarkFileError(path, "answers must be a non-empty list", key=item)
        image_id = str(require(rec, "image_id", path, item=item))
        image = locate_image(images, f"{image_id}.jpg", path, check=check_images, item=item)
        question = str(require(rec, "question", path, item=item)).strip()
        tokens = [str(t) for t in rec.get("ocr_tokens", [])]
        samples.append(
            make_textvqa_sample(qid, question, [str(a) for a in answers], tokens, image, ocr, suffix)
        )
    return samples
