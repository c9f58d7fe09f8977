"""Reading the benchmarks from the Hugging Face hub (``lmms-lab/*`` datasets) instead of disk.

This path needs the optional ``datasets`` package and network access; it is imported lazily so
``vtprune.eval`` works without it. Samples are built by the same ``make_*_sample`` functions as
the local readers, so prompts are identical; images stay in the dataset and are decoded only
when ``Sample.load_image`` is called. Column names follow the lmms-lab dataset cards; a column
that is not there raises :class:`BenchmarkFileError` naming the dataset, row and column.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .readers_choice import CIRCULAR_OFFSET, make_choice_sample
from .readers_vqa import make_gqa_sample, make_textvqa_sample
from .readers_yesno import make_mme_sample, make_pope_sample
from .samples import MULTIPLE_CHOICE_SUFFIX, SHORT_ANSWER_SUFFIX, Sample, apply_limit, letters, require

# benchmark -> (dataset repo, config, default split)
HUB_DATASETS = {
    "pope": ("lmms-lab/POPE", "default", "test"),
    "mme": ("lmms-lab/MME", None, "test"),
    "gqa": ("lmms-lab/GQA", "testdev_balanced_instructions", "testdev"),
    "textvqa": ("lmms-lab/textvqa", None, "validation"),
    "scienceqa": ("lmms-lab/ScienceQA", "ScienceQA-IMG", "test"),
    "mmbench": ("lmms-lab/MMBench", "en", "dev"),
    "seedbench": ("lmms-lab/SEED-Bench", None, "test"),
}
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")

Rows = Iterable[tuple[int, dict[str, Any]]]
ImageAt = Callable[[int], Callable[[], Any]]


class HubUnavailableError(RuntimeError):
    """The hub cannot be reached (offline mode set, or the download failed)."""


def load_from_hub(
    name: str, *, split: str | None = None, limit: int | None = None, cache_dir: str | None = None, **options
) -> list[Sample]:
    """Load benchmark ``name`` from its ``lmms-lab`` dataset (needs ``datasets`` and network).

    ``options`` are the reader options that make sense without files: ``suffix`` everywhere,
    ``ocr`` for TextVQA, ``circular`` for MMBench.

    Example:
        >>> samples = load_from_hub("pope", limit=8)  # doctest: +SKIP
        >>> samples[0].metadata["split"]  # doctest: +SKIP
        'adversarial'
    """
    if name not in HUB_DATASETS:
        raise ValueError(f"no hub dataset for {name!r}; known: {', '.join(HUB_DATASETS)}")
    datasets = _import_datasets()
    offline = [
        v for v in _OFFLINE_VARS if os.environ.get(v, "").strip().lower() in ("1", "on", "yes", "true")
    ]
    if offline:
        raise HubUnavailableError(
            f"load_from_hub({name!r}) needs network access but {' and '.join(offline)} is set; "
            "unset it, or download the files and use load_benchmark()"
        )
    repo, config, default_split = HUB_DATASETS[name]
    split = split or default_split
    table = _download(datasets, repo, config, split, cache_dir)
    source = Path(f"{repo}[{config or 'default'}/{split}]")
    if name == "gqa":
        images = _download(datasets, repo, "testdev_balanced_images", split, cache_dir)
        position = {image_id: i for i, image_id in enumerate(images["id"])}
        image_at = _gqa_image_at(images, position)
    else:
        image_at = _image_at(table)
    text_only = table.remove_columns([c for c in ("image", "images") if c in table.column_names])
    rows = enumerate(text_only)
    return apply_limit(_CONVERTERS[name](rows, source, image_at, **options), limit)


def _import_datasets():
    try:
        import datasets
    except ImportError:
        raise ImportError(
            "load_from_hub needs the optional `datasets` package (pip install datasets); "
            "without it, download the benchmark files and use load_benchmark()"
        ) from None
    return datasets


def _download(datasets, repo: str, config: str | None, split: str, cache_dir: str | None):
    try:
        return datasets.load_dataset(repo, config, split=split, cache_dir=cache_dir)
    except (ConnectionError, OSError) as e:
        raise HubUnavailableError(f"could not download {repo} ({config}, {split}): {e}") from e


def _image_at(table) -> ImageAt:
    column = "image" if "image" in table.column_names else "images"

    def at(i: int):
        # SEED-Bench stores a list of frames; image questions have exactly one.
        return lambda: _first(table[i][column])

    return at


def _gqa_image_at(images, position: dict[str, int]) -> ImageAt:
    return lambda image_id: lambda: images[position[image_id]]["image"]


def _first(value):
    return value[0] if isinstance(value, list) else value


def _pope(rows: Rows, src: Path, image_at: ImageAt, suffix: str = SHORT_ANSWER_SUFFIX) -> list[Sample]:
    out = []
    for i, r in rows:
        split, answer = require(r, "category", src, item=str(i)), require(r, "answer", src, item=str(i))
        question = require(r, "question", src, item=str(i)).strip()
        out.append(
            make_pope_sample(split, r.get("question_id", i), question, answer.lower(), image_at(i), suffix)
        )
    return out


def _mme(rows: Rows, src: Path, image_at: ImageAt, suffix: str = SHORT_ANSWER_SUFFIX) -> list[Sample]:
    out, seen = [], {}
    for i, r in rows:
        subtask = require(r, "category", src, item=str(i))
        stem = Path(str(require(r, "question_id", src, item=str(i)))).stem
        index = seen[subtask, stem] = seen.get((subtask, stem), -1) + 1
        question, answer = require(r, "question", src, item=str(i)).strip(), r["answer"].strip().lower()
        out.append(make_mme_sample(subtask, stem, index, question, answer, image_at(i), suffix))
    return out


def _gqa(rows: Rows, src: Path, image_at: ImageAt, suffix: str = SHORT_ANSWER_SUFFIX) -> list[Sample]:
    out = []
    for i, r in rows:
        image_id = require(r, "imageId", src, item=str(i))
        question = require(r, "question", src, item=str(i)).strip()
        out.append(make_gqa_sample(r.get("id", i), question, r["answer"], image_at(image_id), suffix))
    return out


def _textvqa(
    rows: Rows, src: Path, image_at: ImageAt, ocr: bool = False, suffix: str = SHORT_ANSWER_SUFFIX
) -> list[Sample]:
    out = []
    for i, r in rows:
        answers = [str(a) for a in require(r, "answers", src, item=str(i))]
        tokens = [str(t) for t in r.get("ocr_tokens") or []]
        question = require(r, "question", src, item=str(i)).strip()
        out.append(
            make_textvqa_sample(r.get("question_id", i), question, answers, tokens, image_at(i), ocr, suffix)
        )
    return out


def _scienceqa(
    rows: Rows, src: Path, image_at: ImageAt, suffix: str = MULTIPLE_CHOICE_SUFFIX
) -> list[Sample]:
    out = []
    for i, r in rows:
        choices = [str(c) for c in require(r, "choices", src, item=str(i))]
        answer = letters(len(choices))[int(require(r, "answer", src, item=str(i)))]
        hint = (r.get("hint") or "").strip()
        meta = {k: r.get(k) for k in ("subject", "grade", "topic", "category")}
        question = require(r, "question", src, item=str(i)).strip()
        context = f"Context: {hint}" if hint else ""
        out.append(
            make_choice_sample(
                "scienceqa", i, question, choices, answer, image_at(i), suffix, context=context, metadata=meta
            )
        )
    return out


def _mmbench(
    rows: Rows, src: Path, image_at: ImageAt, circular: bool = True, suffix: str = MULTIPLE_CHOICE_SUFFIX
) -> list[Sample]:
    out = []
    for i, r in rows:
        index = int(require(r, "index", src, item=str(i)))
        if index >= CIRCULAR_OFFSET and not circular:
            continue
        choices = [str(r[c]).strip() for c in "ABCD" if r.get(c) not in (None, "", "nan")]
        hint = "" if r.get("hint") in (None, "nan") else str(r["hint"]).strip()
        meta = {"index": index, "category": r.get("category"), "l2_category": r.get("l2-category")}
        meta["circular_copy"] = index >= CIRCULAR_OFFSET
        group = str(index % CIRCULAR_OFFSET)
        question, answer = require(r, "question", src, item=str(i)).strip(), r.get("answer")
        out.append(
            make_choice_sample(
                "mmbench",
                index,
                question,
                choices,
                answer,
                image_at(i),
                suffix,
                context=hint,
                group=group,
                metadata=meta,
            )
        )
    return out


def _seedbench(
    rows: Rows, src: Path, image_at: ImageAt, suffix: str = MULTIPLE_CHOICE_SUFFIX
) -> list[Sample]:
    out = []
    for i, r in rows:
        if r.get("data_type", "image") != "image":
            continue
        choices = [str(require(r, f"choice_{c}", src, item=str(i))) for c in "abcd"]
        meta = {"question_type_id": r.get("question_type_id"), "question_type": None}
        qid, question = r.get("question_id", i), require(r, "question", src, item=str(i)).strip()
        out.append(
            make_choice_sample(
                "seedbench", qid, question, choices, r["answer"], image_at(i), suffix, metadata=meta
            )
        )
    return out


_CONVERTERS: dict[str, Callable[..., list[Sample]]] = {
    "pope": _pope,
    "mme": _mme,
    "gqa": _gqa,
    "textvqa": _textvqa,
    "scienceqa": _scienceqa,
    "mmbench": _mmbench,
    "seedbench": _seedbench,
}
