"""Yes/no scoring: POPE (per-split accuracy, precision, recall, F1, yes-ratio) and MME (acc + acc+)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from .readers_yesno import MME_SUBTASKS
from .samples import Sample, align_predictions


def parse_yes_no_strict(text: str) -> str:
    """lmms-eval's POPE parsing: the whole answer must be ``yes`` or ``no``, else ``"other"``.

    Example:
        >>> parse_yes_no_strict(" Yes "), parse_yes_no_strict("Yes, there is.")
        ('yes', 'other')
    """
    answer = text.lower().strip()
    return answer if answer in ("yes", "no") else "other"


def parse_yes_no_lenient(text: str) -> str:
    """LLaVA's POPE parsing: first sentence, commas dropped; ``no`` if a word is No/no/not, else ``yes``.

    Example:
        >>> parse_yes_no_lenient("There is not a dog. No wait, yes."), parse_yes_no_lenient("Sure")
        ('no', 'yes')
    """
    first = text.split(".")[0].replace(",", "")
    # LLaVA's word test is case-sensitive ("NO" reads as yes); kept for comparable numbers.
    return "no" if any(w in ("No", "no", "not") for w in first.split()) else "yes"


POPE_PARSERS: dict[str, Callable[[str], str]] = {
    "strict": parse_yes_no_strict,
    "lenient": parse_yes_no_lenient,
}


def binary_metrics(labels: Sequence[str], parsed: Sequence[str]) -> dict:
    """Accuracy, precision, recall, F1 and yes-ratio with ``yes`` as the positive class.

    A parsed ``"other"`` is a wrong answer and counts as a negative prediction.

    Example:
        >>> m = binary_metrics(["yes", "yes", "no", "no"], ["yes", "no", "yes", "no"])
        >>> m["precision"], m["recall"], m["f1"], m["yes_ratio"]
        (0.5, 0.5, 0.5, 0.5)
    """
    pairs = list(zip(labels, parsed))
    tp = sum(lab == "yes" and p == "yes" for lab, p in pairs)
    fp = sum(lab == "no" and p == "yes" for lab, p in pairs)
    tn = sum(lab == "no" and p == "no" for lab, p in pairs)
    fn = sum(lab == "yes" and p != "yes" for lab, p in pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "n": len(pairs),
        "accuracy": sum(lab == p for lab, p in pairs) / len(pairs),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": sum(p == "yes" for _, p in pairs) / len(pairs),
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "other": sum(p == "other" for _, p in pairs),
    }


def score_pope(
    samples: Sequence[Sample], predictions: Mapping[str, str] | Sequence[str], parser: str = "strict"
) -> dict:
    """POPE metrics in [0, 1] per split, plus the mean F1 and accuracy over splits (as papers report).

    ``parser`` is ``"strict"`` (lmms-eval) or ``"lenient"`` (LLaVA); its name is in the result.

    Example:
        >>> s = [Sample("pope", i, "q", "q", [a], metadata={"split": "random"}) for i, a in [("1", "yes"), ("2", "no")]]
        >>> score_pope(s, ["Yes", "No."], parser="lenient")["splits"]["random"]["accuracy"]
        1.0
    """
    if parser not in POPE_PARSERS:
        raise ValueError(f"unknown POPE parser {parser!r}; expected one of {tuple(POPE_PARSERS)}")
    preds = align_predictions(samples, predictions)
    parse = POPE_PARSERS[parser]
    by_split: dict[str, tuple[list[str], list[str]]] = {}
    for s, p in zip(samples, preds):
        labels, parsed = by_split.setdefault(s.metadata.get("split", "all"), ([], []))
        labels.append(s.answer)
        parsed.append(parse(p))
    splits = {name: binary_metrics(labels, parsed) for name, (labels, parsed) in by_split.items()}
    return {
        "parser": parser,
        "n": len(samples),
        "splits": splits,
        "mean_f1": sum(m["f1"] for m in splits.values()) / len(splits),
        "mean_accuracy": sum(m["accuracy"] for m in splits.values()) / len(splits),
    }


def parse_mme(text: str) -> str:
    """MME's parsing: ``yes``/``no``, else whichever of them the first 4 characters contain, else ``other``.

    Example:
        >>> parse_mme("Yes."), parse_mme("No, it is not."), parse_mme("Maybe")
        ('yes', 'no', 'other')
    """
    answer = text.lower().strip().replace(".", "")
    if answer in ("yes", "no"):
        return answer
    prefix = answer[:4]
    return "yes" if "yes" in prefix else "no" if "no" in prefix else "other"


def score_mme(samples: Sequence[Sample], predictions: Mapping[str, str] | Sequence[str]) -> dict:
    """MME scores: per subtask ``acc`` and ``acc_plus`` (x100) and their sum; category totals.

    ``acc_plus`` counts an image right only if all its questions are right. ``perception`` sums
    the scores of the perception subtasks present (max 2000 for all 10), ``cognition`` likewise
    (max 800 for all 4).

    Example:
        >>> s = [Sample("mme", str(i), "q", "q", ["yes"], group="img", metadata={"subtask": "OCR"}) for i in range(2)]
        >>> score_mme(s, ["yes", "no"])["subtasks"]["OCR"]["score"]  # acc 50 + acc+ 0
        50.0
    """
    preds = align_predictions(samples, predictions)
    by_task: dict[str, dict[str, list[bool]]] = {}
    for s, p in zip(samples, preds):
        images = by_task.setdefault(s.metadata.get("subtask", "unknown"), {})
        images.setdefault(s.group_key, []).append(parse_mme(p) == s.answer.lower())
    subtasks = {task: _mme_subtask(images) for task, images in by_task.items()}
    totals = {"perception": 0.0, "cognition": 0.0}
    for task, m in subtasks.items():
        category = MME_SUBTASKS.get(task)
        if category is not None:
            totals[category] += m["score"]
    return {
        "parser": "mme_prefix",
        "n": len(samples),
        "subtasks": subtasks,
        **totals,
        "total": sum(totals.values()),
    }


def _mme_subtask(images: dict[str, list[bool]]) -> dict:
    answers = [ok for oks in images.values() for ok in oks]
    acc = 100 * sum(answers) / len(answers)
    acc_plus = 100 * sum(all(oks) for oks in images.values()) / len(images)
    return {
        "acc": acc,
        "acc_plus": acc_plus,
        "score": acc + acc_plus,
        "n_questions": len(answers),
        "n_images": len(images),
    }
