"""SynthVQA: a procedurally generated, seeded visual question task whose answers live in small regions.

Each item is a 192x192 canvas with 3-7 coloured shapes in a 4x4 grid and one question with a single-word
answer, of four balanced types:

* ``exist``     "is there a red circle ?"                        yes/no, negatives share one attribute
                                                                 with a present object (adversarial)
* ``attribute`` "what color is the triangle ?"                   one of 5 colours
* ``count``     "how many blue objects are there ?"              0..4
* ``spatial``   "is the red circle left of the blue square ?"    yes/no (also "above")

Because the background is empty and every object covers ~1/16 of the image, a model must keep the visual
tokens of the few relevant cells: dropping them changes the answer. That makes the task a fast, offline
fidelity benchmark for visual-token pruning, and it is what the embedded tiny models are trained on.

The prompt format used for both training and evaluation is :func:`build_prompt` (one place only).

Example:
    >>> items = generate_synthvqa(8, seed=0)
    >>> sorted({it["qtype"] for it in items})
    ['attribute', 'count', 'exist', 'spatial']
    >>> score_synthvqa(items, [it["answer"] for it in items])["accuracy"]
    1.0
"""

from __future__ import annotations

import json
import os
import random
from collections import defaultdict
from collections.abc import Mapping, Sequence

from PIL import Image

from .synthvqa_scenes import (
    ANSWER_SPACE,
    AUX_QTYPES,
    MAX_OBJECTS,
    MIN_OBJECTS,
    QTYPES,
    ask,
    layout_objects,
    make_question,
    render_scene,
    task_vocabulary,
)

__all__ = [
    "ANSWER_SPACE",
    "ARCHS",
    "AUX_QTYPES",
    "DEFAULT_IMAGE_SIZE",
    "QTYPES",
    "build_prompt",
    "build_target",
    "generate_synthvqa",
    "normalize_answer",
    "prompt_parts",
    "read_synthvqa",
    "score_synthvqa",
    "task_vocabulary",
    "write_synthvqa",
]

DEFAULT_IMAGE_SIZE = 192
ARCHS = ("llava", "qwen2_vl")
JSONL_NAME = "synthvqa.jsonl"

# (text before the question incl. the image placeholder, text after the question, answer template).
# They mirror the real LLaVA-1.5 ("USER: <image>\n... ASSISTANT:") and Qwen2-VL chat formats. Pieces meet
# at whitespace or special tokens, so tokenising the parts separately equals tokenising the whole prompt
# (the trainer relies on this to pack several questions per image).
_PROMPTS: dict[str, tuple[str, str, str]] = {
    "llava": ("USER: <image>\n", " ASSISTANT:", " {answer}</s>"),
    "qwen2_vl": (
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>",
        "<|im_end|>\n<|im_start|>assistant\n",
        "{answer}<|im_end|>",
    ),
}


def _check_arch(arch: str) -> str:
    if arch not in _PROMPTS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    return arch


def prompt_parts(arch: str) -> tuple[str, str]:
    """(prefix, suffix) around the question; the prefix holds the single image placeholder.

    Example:
        >>> prompt_parts("llava")
        ('USER: <image>\\n', ' ASSISTANT:')
    """
    prefix, suffix, _ = _PROMPTS[_check_arch(arch)]
    return prefix, suffix


def build_prompt(question: str, arch: str) -> str:
    """The one prompt format for training and evaluation (before the processor expands the image token).

    Example:
        >>> build_prompt("is there a red circle ?", "llava")
        'USER: <image>\\nis there a red circle ? ASSISTANT:'
        >>> build_prompt("is there a red circle ?", "qwen2_vl")  # doctest: +NORMALIZE_WHITESPACE
        '<|im_start|>user\\n<|vision_start|><|image_pad|><|vision_end|>is there a red circle
        ?<|im_end|>\\n<|im_start|>assistant\\n'
    """
    prefix, suffix = prompt_parts(arch)
    return f"{prefix}{question.strip()}{suffix}"


def build_target(answer: str, arch: str) -> str:
    """Text the model is trained to emit after :func:`build_prompt`: the answer and end-of-turn token.

    Example:
        >>> build_target("yes", "llava")
        ' yes</s>'
    """
    return _PROMPTS[_check_arch(arch)][2].format(answer=answer)


def generate_synthvqa(
    n: int,
    seed: int = 0,
    image_size: int = DEFAULT_IMAGE_SIZE,
    split: str = "test",
    start: int = 0,
    questions_per_image: int = 1,
    n_objects: tuple[int, int] = (MIN_OBJECTS, MAX_OBJECTS),
    extra_qtypes: Sequence[str] = QTYPES,
) -> list[dict]:
    """Generate ``n`` items deterministically; item ``i`` depends only on (split, seed, i), not on ``n``.

    Question types cycle exist/attribute/count/spatial and answers cycle through the answer space, so a
    multiple of 40 items is exactly balanced. Each item: ``id, image (PIL RGB), question, answer, qtype,
    choices (answer space), objects (shape, colour, size, row, col, bbox), focus (evidence objects)``.
    With ``questions_per_image > 1`` an item also has ``extra``: further {question, answer, qtype, focus}
    about the same image (used to pack several questions per image during training). ``n_objects``
    (default 3..7) is lowered only for the training curriculum; ``extra_qtypes`` may add the auxiliary
    training-only types ``AUX_QTYPES`` ("what shape is the red object ?", "which row is the red circle in
    ?") to the extra questions.

    Example:
        >>> item = generate_synthvqa(1, seed=3)[0]
        >>> item["qtype"], item["answer"] in item["choices"], item["image"].size
        ('exist', True, (192, 192))
    """
    items = []
    for i in range(start, start + n):
        rng = random.Random(f"synthvqa:{split}:{seed}:{i}")  # str seeds are hashed: stable across runs
        qtype = QTYPES[i % len(QTYPES)]
        objects, question, answer, focus = make_question(rng, qtype, i // len(QTYPES), n_objects)
        objects = layout_objects(objects, image_size, rng)
        item = {
            "id": f"synthvqa-{split}-{seed}-{i:07d}",
            "image": render_scene(objects, image_size),
            "question": question,
            "answer": answer,
            "qtype": qtype,
            "choices": list(ANSWER_SPACE[qtype]),
            "objects": [o.to_dict() for o in objects],
            "focus": focus,
        }
        if questions_per_image > 1:
            item["extra"] = _extra_questions(objects, rng, questions_per_image - 1, question, extra_qtypes)
        items.append(item)
    return items


def _extra_questions(objects, rng: random.Random, k: int, skip: str, qtypes: Sequence[str]) -> list[dict]:
    """Up to ``k`` distinct extra questions about one scene, question types in a shuffled cycle."""
    out, seen = [], {skip}
    for attempt in range(4 * k):
        if len(out) == k:
            break
        qtype = qtypes[(attempt + rng.randrange(len(qtypes))) % len(qtypes)]
        built = ask(objects, rng, qtype)
        if built is None or built[0] in seen:
            continue
        seen.add(built[0])
        out.append({"question": built[0], "answer": built[1], "qtype": qtype, "focus": built[2]})
    return out


def write_synthvqa(
    out_dir: str,
    n: int,
    seed: int = 0,
    split: str = "test",
    image_size: int = DEFAULT_IMAGE_SIZE,
) -> str:
    """Write ``n`` items as ``images/<id>.png`` plus ``synthvqa.jsonl``; returns the JSONL path.

    Example:
        >>> import tempfile
        >>> path = write_synthvqa(tempfile.mkdtemp(), 4, seed=0)
        >>> len(read_synthvqa(os.path.dirname(path)))
        4
    """
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    path = os.path.join(out_dir, JSONL_NAME)
    with open(path, "w", encoding="utf-8") as f:
        for item in generate_synthvqa(n, seed=seed, image_size=image_size, split=split):
            rel = os.path.join("images", f"{item['id']}.png")
            item["image"].save(os.path.join(out_dir, rel))
            record = {k: v for k, v in item.items() if k != "image"}
            record["image"] = rel
            f.write(json.dumps(record) + "\n")
    return path


def read_synthvqa(data_dir: str) -> list[dict]:
    """Read a folder written by :func:`write_synthvqa`; ``image`` becomes a loaded PIL RGB image.

    Example:
        >>> items = read_synthvqa("/path/written/by/write_synthvqa")  # doctest: +SKIP
    """
    items = []
    with open(os.path.join(data_dir, JSONL_NAME), encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            item = json.loads(line)
            with Image.open(os.path.join(data_dir, item["image"])) as im:
                item["image"] = im.convert("RGB")
            items.append(item)
    return items


def normalize_answer(text: str) -> str:
    """Lower-case, strip whitespace and surrounding punctuation (``"Yes."`` -> ``"yes"``).

    Example:
        >>> normalize_answer("  Yes. ")
        'yes'
    """
    return text.strip().lower().strip(".,!?;:'\"").strip()


def score_synthvqa(items: Sequence[Mapping], predictions: Sequence[str] | Mapping[str, str]) -> dict:
    """Exact-match accuracy overall and per question type.

    ``predictions`` is a list aligned with ``items`` or a mapping from item id to predicted text; items
    missing from a mapping count as wrong. Returns ``{"accuracy", "n", "per_qtype": {qtype: acc},
    "n_per_qtype": {qtype: count}}``.

    Example:
        >>> items = [{"id": "a", "answer": "yes", "qtype": "exist"}, {"id": "b", "answer": "2", "qtype": "count"}]
        >>> score_synthvqa(items, {"a": "Yes", "b": "3"})["per_qtype"]
        {'exist': 1.0, 'count': 0.0}
    """
    if isinstance(predictions, Mapping):
        preds = [predictions.get(it["id"]) for it in items]
    else:
        if len(predictions) != len(items):
            raise ValueError(f"{len(predictions)} predictions for {len(items)} items")
        preds = list(predictions)
    correct: dict[str, int] = defaultdict(int)
    total: dict[str, int] = defaultdict(int)
    for item, pred in zip(items, preds):
        total[item["qtype"]] += 1
        if pred is not None and normalize_answer(pred) == normalize_answer(item["answer"]):
            correct[item["qtype"]] += 1
    n = sum(total.values())
    return {
        "accuracy": sum(correct.values()) / n if n else 0.0,
        "n": n,
        "per_qtype": {q: correct[q] / total[q] for q in total},
        "n_per_qtype": dict(total),
    }
