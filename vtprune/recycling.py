"""Recycling of dropped visual tokens into kept ones: pure, vectorised merges.

A vision-stage method decides which of an image's tokens to keep; with recycling, the dropped
tokens are not simply lost but folded into the kept ones, so their content still reaches the
language model (as VScan, HoliTom and VisionZip's contextual tokens do). Any vision stage offers
it through the ``recycle`` option (``VisionStage.recycle``; the stage applies it after its pick):

* ``"none"`` (default): dropped tokens are dropped.
* ``"nearest"``: each dropped token is assigned to its most similar kept token (cosine of the
  projector outputs, the language model's input embeddings) and every kept token's embedding
  becomes the plain mean of itself and the tokens assigned to it (:func:`recycle_nearest`).
* ``"clusters"`` (SparseVLM v1.5-style): the method picks ``budget - c`` tokens
  (:func:`cluster_count`); the dropped tokens are clustered by DPC-kNN (``vtprune.clustering``)
  into ``c`` clusters and each cluster's mean is placed in the slot of its density-peak centre,
  a real dropped token kept at its own position (:func:`recycle_clusters`). The token count is
  the same as without recycling. Unlike SparseVLM, every dropped token is clustered (a vision
  stage has no common relevance score to take SparseVLM's top 30% by), and the centres keep
  their original positions instead of being appended after the kept tokens.

Decisions: only patch tokens take part. LLaVA-NeXT's row-newline tokens are learned separators,
not image content: a dropped newline is not merged anywhere and a kept newline receives nothing.
Kept tokens keep their positions (M-RoPE included); only their input embeddings change. The
merge is computed in float32 and cast back to the embeddings' dtype by the runtime.

Everything stays on the features' device: one similarity product, one ``argmax``, two
``index_add_``; no per-token Python loop and no host read. ``"clusters"`` reads one count per
image back to the host (how many tokens were dropped: it sizes the clustering).
"""

from __future__ import annotations

import torch

from vtprune.clustering import cluster_means, dpc_knn

#: the ``recycle`` option's allowed values
RECYCLE = ("none", "nearest", "clusters")


def check_recycle(method: str, value) -> None:
    """Refuse a bad ``recycle`` option with an error naming the method, the value and the choices.

    Example:
        >>> check_recycle("divprune", "nearest")
        >>> check_recycle("divprune", "mean")
        Traceback (most recent call last):
        ...
        ValueError: divprune: option 'recycle'='mean' is invalid; allowed: 'none', 'nearest', 'clusters'
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
    # the assignment is a selection (not differentiated); the means carry gradients to the features
    x = features.float()
    n, device = x.shape[0], x.device
    kept = kept.to(device=device, dtype=torch.long)
    ok = torch.ones(n, dtype=torch.bool, device=device) if eligible is None else eligible.to(device)
    donor = ok.clone()
    donor[kept] = False  # the dropped, eligible rows
    receiver = ok[kept]  # [k]: kept rows that may take donors
    xn = torch.nn.functional.normalize(x.detach(), dim=-1)
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


#: strategy name -> ``f(features [n, D], kept [k], eligible [n] | None) -> [k, D]`` (the merges
#: into kept tokens; "clusters" adds tokens instead: :func:`recycle_clusters`)
STRATEGIES = {"nearest": recycle_nearest}


def cluster_count(budget: int | None, candidates: int) -> int:
    """Clusters ``c`` that ``recycle="clusters"`` spends of an image's ``budget`` tokens, when the
    method could choose among ``candidates`` (non-newline) tokens: ``max(1, round(budget / 10))``;
    0 when the budget leaves room for no cluster (``budget < 2``), keeps every candidate (nothing
    is dropped) or is the stage's own rule (``None``).

    Why a tenth of the budget: the recycled share stays fixed whatever the keep ratio, and at
    LLaVA's 64 of 576 it gives 6 clusters from the dropped tokens, between SparseVLM's rule
    (``(0.3 p) / 10 + 1`` of the ``p`` pruned tokens, 16 at 64 kept) and none; SparseVLM's rule,
    read on a fixed total, would take a quarter of a 64-token budget and grow as the budget falls.

    Example:
        >>> cluster_count(64, 576), cluster_count(3, 576), cluster_count(1, 576), cluster_count(576, 576)
        (6, 1, 0, 0)
    """
    if budget is None or budget < 2 or budget >= candidates:
        return 0
    return max(1, int(budget / 10 + 0.5))


def recycle_clusters(
    features: torch.Tensor, kept: torch.Tensor, n_clusters: int, eligible: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster the dropped rows of ``features [n, D]`` into ``n_clusters``: ``(centres [c], means [c, D])``.

    ``kept [k]`` are the picked indices; every other ``eligible`` row (``[n]`` bool, default all)
    is clustered by DPC-kNN (``vtprune.clustering.dpc_knn``, ``c = min(n_clusters, dropped)``).
    ``centres`` are the density-peak rows (indices into ``features``, dropped rows), ``means``
    the float32 mean of each centre's cluster: the embedding its slot takes. Reads the dropped
    count back to the host (it sizes the clustering).

    Example:
        >>> x = torch.tensor([[0.0, 0], [0.1, 0], [0.0, 0.1], [5.0, 5], [5.1, 5], [9.0, 0]])
        >>> centres, means = recycle_clusters(x, torch.tensor([5]), 2)
        >>> centres.tolist(), means.mul(30).round().tolist()
        ([0, 3], [[1.0, 1.0], [152.0, 150.0]])
        >>> recycle_clusters(x, torch.arange(6), 2)[0].numel()  # nothing dropped: no clusters
        0
    """
    n, device = features.shape[0], features.device
    dropped = (
        torch.ones(n, dtype=torch.bool, device=device) if eligible is None else eligible.to(device).clone()
    )
    dropped[kept.to(device=device, dtype=torch.long)] = False
    members = torch.nonzero(dropped).flatten()  # the one host read: the dropped count
    c = min(n_clusters, members.numel())
    if c == 0:
        return members[:0], features.new_zeros(0, features.shape[1], dtype=torch.float32)
    x = features[members].detach().float()
    local, labels = dpc_knn(x, c)
    return members[local], cluster_means(x, labels, c)
