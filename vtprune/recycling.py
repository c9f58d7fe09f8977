"""Recycling of dropped visual tokens into kept ones: pure, vectorised merges.

A vision-stage method decides which of an image's tokens to keep; with recycling, the dropped
tokens are not simply lost but folded into the kept ones, so their content still reaches the
language model (as VScan, HoliTom and VisionZip's contextual tokens do). Any vision stage offers
it through the ``recycle`` option (``VisionStage.recycle``; the stage applies it after its pick):

* ``"none"`` (default): dropped tokens are dropped.
* ``"nearest"``: each dropped token is assigned to its most similar kept token (cosine of the
  projector outputs, the language model's input embeddings) and every kept token's embedding
  becomes the plain mean of itself and the tokens assigned to it (:func:`recycle_nearest`).
* ``"clusters"`` (SparseVLM v1.5 / HoliTom: DPC-kNN cluster centres among the dropped tokens,
  each cluster merged into one recycled token) is reserved here: it needs the DPC-kNN clustering
  of ``vtprune.clustering``; add it to :data:`STRATEGIES` when that lands.

Decisions: only patch tokens take part. LLaVA-NeXT's row-newline tokens are learned separators,
not image content: a dropped newline is not merged anywhere and a kept newline receives nothing.
Kept tokens keep their positions (M-RoPE included); only their input embeddings change. The
merge is computed in float32 and cast back to the embeddings' dtype by the runtime.

Everything stays on the features' device: one similarity product, one ``argmax``, two
``index_add_``; no per-token Python loop and no host read.
"""

from __future__ import annotations

import torch

#: the ``recycle`` option's allowed values ("clusters" joins when vtprune.clustering lands)
RECYCLE = ("none", "nearest")


def check_recycle(method: str, value) -> None:
    """Refuse a bad ``recycle`` option with an error naming the method, the value and the choices.

    Example:
        >>> check_recycle("divprune", "nearest")
        >>> check_recycle("divprune", "mean")
        Traceback (most recent call last):
        ...
        ValueError: divprune: option 'recycle'='mean' is invalid; allowed: 'none', 'nearest'
    """
    if not isinstance(value, str) or value not in RECYCLE:
        raise ValueError(
            f"{method}: option 'recycle'={value!r} is invalid; allowed: {', '.join(map(repr, RECYCLE))}"
        )


def recycle_nearest(
    features: torch.Tensor, kept: torch.Tensor, eligible: torch.Tensor | None = None
) -> torch.Tensor:
    """``[k, D]`` float32: the kept rows of ``features [n, D]`` with each dropped row averaged in.

    ``kept [k]`` are the kept indices (distinct); every other row is dropped. Each dropped row
    that is ``eligible`` (``[n]`` bool, default all) goes to the eligible kept row with the
    largest cosine similarity (ties: the first in ``kept`` order); each kept row becomes the mean
    of itself and the rows assigned to it. Ineligible kept rows come back unchanged, ineligible
    dropped rows are assigned nowhere.

    Example:
        >>> x = torch.tensor([[1.0, 0], [0, 1], [0.9, 0.1], [0.2, 0.8], [0.1, 0.9]])
        >>> recycle_nearest(x, torch.tensor([0, 1])).mul(100).round().tolist()  # 2 joins 0; 3, 4 join 1
        [[95.0, 5.0], [10.0, 90.0]]
        >>> recycle_nearest(x, torch.arange(5)).equal(x)  # nothing dropped: nothing changes
        True
    """
    x = features.detach().float()  # a selection-side merge, not differentiated
    n, device = x.shape[0], x.device
    kept = kept.to(device=device, dtype=torch.long)
    ok = torch.ones(n, dtype=torch.bool, device=device) if eligible is None else eligible.to(device)
    donor = ok.clone()
    donor[kept] = False  # the dropped, eligible rows
    receiver = ok[kept]  # [k]: kept rows that may take donors
    xn = torch.nn.functional.normalize(x, dim=-1)
    sim = xn @ xn[kept].T  # [n, k]
    sim = sim.masked_fill(~receiver, float("-inf"))
    target = sim.argmax(1)  # [n]: each row's most similar eligible kept row
    # no eligible receiver (e.g. only newlines kept): nothing is merged
    weight = (donor & receiver.any()).float()
    sums = x[kept].index_add(0, target, x * weight.unsqueeze(1))
    counts = torch.ones(kept.numel(), device=device).index_add(0, target, weight)
    return sums / counts.unsqueeze(1)


def recycle(strategy: str, features: torch.Tensor, kept: torch.Tensor, eligible: torch.Tensor | None = None):
    """``[k, D]`` new embeddings of the ``kept`` rows under ``strategy`` (a :data:`RECYCLE` value
    other than ``"none"``).

    Example:
        >>> recycle("nearest", torch.eye(2), torch.tensor([1])).tolist()
        [[0.5, 0.5]]
    """
    if strategy not in STRATEGIES:
        raise ValueError(
            f"recycle strategy {strategy!r} is invalid; allowed: {', '.join(map(repr, STRATEGIES))}"
        )
    return STRATEGIES[strategy](features, kept, eligible)


#: strategy name -> ``f(features [n, D], kept [k], eligible [n] | None) -> [k, D]``;
#: "clusters" (DPC-kNN, vtprune.clustering) plugs in here with the same signature
STRATEGIES = {"nearest": recycle_nearest}
