"""The scorer registry: ``score(benchmark, samples, predictions)`` -> dict of metrics.

Every result names the answer ``parser`` it used and its ``main_metric`` (the number papers
report), so a result file is self-describing. Scales follow each benchmark's convention:
fractions in [0, 1] everywhere except MME, whose scores are x100 sums (max 2000 / 800).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from .samples import Sample
from .scoring_choice import score_mmbench, score_scienceqa, score_seedbench
from .scoring_vqa import score_gqa, score_textvqa
from .scoring_yesno import score_mme, score_pope

SCORERS: dict[str, Callable[..., dict]] = {
    "pope": score_pope,
    "mme": score_mme,
    "gqa": score_gqa,
    "textvqa": score_textvqa,
    "scienceqa": score_scienceqa,
    "mmbench": score_mmbench,
    "seedbench": score_seedbench,
}

# The headline number of each result, e.g. for "accuracy kept" = pruned / unpruned.
MAIN_METRICS = {
    "pope": "mean_f1",
    "mme": "total",
    "gqa": "accuracy",
    "textvqa": "accuracy",
    "scienceqa": "accuracy",
    "mmbench": "circular_accuracy",
    "seedbench": "accuracy",
}


def score(
    benchmark: str, samples: Sequence[Sample], predictions: Mapping[str, str] | Sequence[str], **options
) -> dict:
    """Score ``predictions`` (a dict keyed by ``sample_id``, or a list in sample order).

    ``options`` go to the benchmark's scorer, e.g. ``parser="lenient"`` for POPE or
    ``parser="first_letter"`` for SEED-Bench.

    Example:
        >>> s = [Sample("gqa", "1", "Color?", "Color?", ["red"])]
        >>> r = score("gqa", s, {"1": "Red"})
        >>> r["accuracy"], r["parser"], r["main_metric"]
        (1.0, 'gqa_exact_match', 'accuracy')
    """
    scorer = SCORERS.get(benchmark)
    if scorer is None:
        raise ValueError(f"unknown benchmark {benchmark!r}; known: {', '.join(SCORERS)}")
    others = sorted({s.benchmark for s in samples} - {benchmark})
    if others:
        raise ValueError(f"scoring {benchmark!r} but samples come from {others}")
    missing_gold = [s.sample_id for s in samples if not s.answers]
    if missing_gold:
        raise ValueError(
            f"{len(missing_gold)} samples have no gold answer (e.g. {missing_gold[:3]}); test splits cannot be scored locally"
        )
    result = scorer(samples, predictions, **options)
    return {"benchmark": benchmark, "main_metric": MAIN_METRICS[benchmark], **result}
