"""Tasks for the runner: samples of a benchmark or of SynthVQA, chat prompts, and scoring.

A task is a benchmark name from :mod:`vtprune.eval.benchmarks.readers` (read from local files) or
``"synthvqa"``, which needs no files: its items are generated (or read from a folder written by
:func:`vtprune.eval.synthetic.synthvqa.write_synthvqa`). Options given as ``"task:key=value,..."`` are
split between the reader and the scorer (``parser`` goes to the scorer).
"""

from __future__ import annotations

import inspect
from pathlib import Path

from vtprune.eval.benchmarks.readers import READERS, load_benchmark
from vtprune.eval.benchmarks.samples import Sample
from vtprune.eval.benchmarks.scoring import MAIN_METRICS, SCORERS, score
from vtprune.eval.harness.plans import parse_plan

SYNTHVQA = "synthvqa"
SYNTHVQA_DEFAULT_N = 200
SCORER_OPTIONS = ("parser",)


def task_names() -> list[str]:
    """Every task the runner knows.

    Example:
        >>> task_names()[-1]
        'synthvqa'
    """
    return [*READERS, SYNTHVQA]


def parse_task(text: str) -> tuple[str, dict, dict]:
    """``"pope:parser=lenient,splits=random"`` -> (name, reader options, scorer options).

    Example:
        >>> parse_task("pope:parser=lenient,splits=random")
        ('pope', {'splits': ('random',)}, {'parser': 'lenient'})
    """
    name, opts = parse_plan(text)
    if name not in task_names():
        raise ValueError(f"unknown task {name!r}; known: {', '.join(task_names())}")
    score_opts = {k: opts.pop(k) for k in SCORER_OPTIONS if k in opts}
    params = inspect.signature(READERS[name]).parameters if name in READERS else {}
    for key, value in opts.items():
        # "splits=random" names one split: the readers expect a tuple there, not a string
        if key in params and "tuple" in str(params[key].annotation):
            opts[key] = tuple(value) if isinstance(value, list) else (value,)
    return name, opts, score_opts


def _synthvqa_samples(data_dir: str | Path | None, limit: int | None) -> list[Sample]:
    from vtprune.eval.synthetic.synthvqa import JSONL_NAME, generate_synthvqa, read_synthvqa

    folder = None
    if data_dir is not None:
        for candidate in (Path(data_dir) / SYNTHVQA, Path(data_dir)):
            if (candidate / JSONL_NAME).is_file():
                folder = candidate
    if folder is not None:
        items = read_synthvqa(str(folder))[:limit]
    else:
        # items are deterministic in (split, seed, index): every process generates the same ones
        items = generate_synthvqa(SYNTHVQA_DEFAULT_N if limit is None else limit, seed=0, split="test")
    return [
        Sample(
            SYNTHVQA,
            it["id"],
            it["question"],
            it["question"],
            [it["answer"]],
            image=lambda img=it["image"]: img,
            choices=list(it["choices"]),
            metadata={"qtype": it["qtype"]},
        )
        for it in items
    ]


def load_task(name: str, data_dir: str | Path | None, limit: int | None = None, **options) -> list[Sample]:
    """Samples of a task; a benchmark is read from ``data_dir/<name>`` if that exists, else ``data_dir``.

    Example:
        >>> [s.metadata["qtype"] for s in load_task("synthvqa", None, limit=2)]
        ['exist', 'attribute']
    """
    if name == SYNTHVQA:
        return _synthvqa_samples(data_dir, limit)
    if data_dir is None:
        raise ValueError(f"task {name!r} needs --data-dir (the folder with its official files)")
    folder = Path(data_dir) / name
    return load_benchmark(name, folder if folder.is_dir() else data_dir, limit=limit, **options)


def score_task(name: str, samples: list[Sample], predictions: dict[str, str], **options) -> dict:
    """Scorer result with ``parser``, ``main_metric`` and ``main_score`` (the headline number).

    Example:
        >>> s = load_task("synthvqa", None, limit=2)
        >>> score_task("synthvqa", s, {x.sample_id: x.answer for x in s})["main_score"]
        1.0
    """
    if name == SYNTHVQA:
        from vtprune.eval.synthetic.synthvqa import score_synthvqa

        items = [{"id": s.sample_id, "answer": s.answer, "qtype": s.metadata["qtype"]} for s in samples]
        result = {
            "benchmark": SYNTHVQA,
            "main_metric": "accuracy",
            "parser": "synthvqa_exact_match",
            **score_synthvqa(items, predictions),
        }
    else:
        result = score(name, samples, predictions, **options)
    result["main_score"] = result[result["main_metric"]]
    return result


def parser_name(name: str, samples: list[Sample], **options) -> str:
    """The answer parser the scorer will use (recorded in every per-sample record).

    Found by scoring the first sample once, so it is exactly the scorer's own name for it.

    Example:
        >>> parser_name("gqa", [Sample("gqa", "1", "q", "q", ["red"])])
        'gqa_exact_match'
    """
    if not samples:
        return "unknown"
    first = samples[:1]
    return score_task(name, first, {first[0].sample_id: first[0].answer}, **options)["parser"]


def chat_prompt(processor, text: str, images: int = 1) -> str:
    """The exact text given to the processor: the model's chat template around one user turn.

    ``images`` placeholders come first (``True``/``False`` count as 1/0). Without a chat
    template the LLaVA-1.5 format ``USER: <image>\\n... ASSISTANT:`` is used.

    Example:
        >>> from vtprune.eval.synthetic.tiny_models import build_processor
        >>> chat_prompt(build_processor("llava"), "is there a red circle ?")
        'USER: <image>\\nis there a red circle ? ASSISTANT:'
    """
    if getattr(processor, "chat_template", None):
        content = [{"type": "image"}] * int(images) + [{"type": "text", "text": text}]
        messages = [{"role": "user", "content": content}]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    token = getattr(processor, "image_token", None) or "<image>"
    placeholders = (token + "\n") * int(images)
    return f"USER: {placeholders}{text} ASSISTANT:"


__all__ = [
    "MAIN_METRICS",
    "SCORERS",
    "SYNTHVQA",
    "chat_prompt",
    "load_task",
    "parse_task",
    "parser_name",
    "score_task",
    "task_names",
]
