"""Set-level selection building blocks: pure functions from features to kept indices.

Nothing here knows about models, hooks or images; vision-stage methods call these on an image's
features (``ImageView.features``). Everything stays on the features' device: the greedy loops
below run ``k`` small tensor operations and never read a value back to the host.
"""

from __future__ import annotations

import torch

from vtprune.selection import topk_mask


def cosine_distances(x: torch.Tensor) -> torch.Tensor:
    """``[N, N]`` float32 cosine distances ``1 - cos(x_i, x_j)`` of the rows of ``x [N, D]``.

    Example:
        >>> cosine_distances(torch.tensor([[1.0, 0], [0, 2], [3, 0]])).tolist()
        [[0.0, 1.0, 0.0], [1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]
    """
    xn = torch.nn.functional.normalize(x.detach().float(), dim=-1)  # selections are not differentiated
    return 1.0 - xn @ xn.T


def max_min_diversity(
    x: torch.Tensor, k: int, distances: torch.Tensor | None = None, first: torch.Tensor | int | None = None
) -> torch.Tensor:
    """Greedy max-min diversity (farthest-point) selection of ``k`` rows of ``x [N, D]``, sorted.

    The rule of DivPrune (Alvar et al., CVPR 2025) with cosine distance: the first row is the one
    whose nearest other row is farthest (the largest second-smallest entry of its distance column,
    its own distance being the smallest); each next row is the one farthest from the rows chosen
    so far (largest minimum distance). A running minimum over the chosen rows makes it
    ``O(N k)`` after the ``O(N^2 D)`` distance matrix, in ``k`` device steps without host reads.
    Ties go to the lowest index (as ``argmax``); a chosen row is never chosen again (the official
    loop could re-pick one only when every remaining row duplicates a chosen one).

    ``distances`` may be given (``[N, N]``, e.g. :func:`cosine_distances` computed once for a batch).
    ``first`` fixes the first row instead (an index, e.g. the most important token as ToDRE's
    k-center starts from); the rest of the rule is unchanged.

    Example:
        >>> x = torch.tensor([[1.0, 0], [0.9, 0.1], [0, 1], [-1, 0.05]])
        >>> max_min_diversity(x, 2).tolist()  # row 3 is the most isolated; row 0 is farthest from it
        [0, 3]
        >>> max_min_diversity(x, 0).tolist(), max_min_diversity(x, 9).tolist()
        ([], [0, 1, 2, 3])
        >>> max_min_diversity(x, 2, first=2).tolist()  # from row 2, row 0 is the farthest
        [0, 2]
    """
    n, device = x.shape[0], x.device
    k = max(0, min(int(k), n))
    if k in (0, n):
        return _all_or_none(k, device)
    d = cosine_distances(x) if distances is None else distances.detach().float()
    chosen = torch.empty(k, dtype=torch.long, device=device)
    # first: the row whose nearest neighbour (second-smallest distance, after itself) is farthest
    if first is None:
        first = torch.argmax(torch.topk(d, 2, dim=0, largest=False).values[1])
    else:
        first = torch.as_tensor(first, device=d.device)
    chosen[0] = first
    nearest = d[first].clone()  # each row's distance to its nearest chosen row
    nearest[first] = float("-inf")
    for i in range(1, k):
        nxt = torch.argmax(nearest)
        chosen[i] = nxt
        torch.minimum(nearest, d[nxt], out=nearest)
        nearest[nxt] = float("-inf")
    return chosen.sort().values


def dpp_greedy_map(similarity: torch.Tensor, quality: torch.Tensor | None, k: int) -> torch.Tensor:
    """Greedy MAP inference for a DPP with kernel ``L = diag(q) S diag(q)``: ``k`` indices, sorted.

    The fast greedy algorithm of Chen et al. (NeurIPS 2018) with incremental Cholesky updates:
    each step adds the item with the largest conditional variance ``d_j^2`` (the Schur
    complement of ``L`` on the chosen set: the factor by which ``det L[Y]`` grows), i.e. the
    item that maximises ``log det L[Y + j]``; then every ``d^2`` is lowered by the new Cholesky
    row ``e = (L[j] - c_j C) / d_j``. ``O(N k^2)`` after the kernel, in ``k`` device steps
    without host reads. ``S [N, N]`` is a similarity (PSD, e.g. a cosine Gram matrix) and
    ``quality [N]`` any non-negative score (``None``: all ones, pure diversity). Ties go to the
    lowest index; once the kernel's rank is spent (every remaining ``d^2`` below ``1e-6`` of the
    largest diagonal entry) the remaining picks take the largest remaining ``d^2`` with no
    further update (the exact greedy is undefined there: every ``det`` is zero).

    Example:
        >>> s = torch.tensor([[1.0, 0.9, 0.0], [0.9, 1.0, 0.0], [0.0, 0.0, 1.0]])
        >>> dpp_greedy_map(s, None, 2).tolist()  # 0 and 1 nearly duplicate each other
        [0, 2]
        >>> dpp_greedy_map(s, torch.tensor([1.0, 2.0, 1.5]), 2).tolist()  # quality prefers 1 to 0
        [1, 2]
        >>> dpp_greedy_map(s, None, 0).tolist(), dpp_greedy_map(s, None, 5).tolist()
        ([], [0, 1, 2])
    """
    n, device = similarity.shape[0], similarity.device
    k = max(0, min(int(k), n))
    if k in (0, n):
        return _all_or_none(k, device)
    kernel = similarity.detach().float()
    if quality is not None:
        q = quality.detach().float()
        kernel = q.unsqueeze(1) * kernel * q.unsqueeze(0)
    d2 = torch.diagonal(kernel).clone()  # conditional variances of the unchosen items
    tol = d2.max() * 1e-6
    rows = torch.zeros(k, n, device=device)  # the Cholesky rows C, one per chosen item
    chosen = torch.empty(k, dtype=torch.long, device=device)
    for i in range(k):
        j = torch.argmax(d2)
        chosen[i] = j
        dj = d2[j]
        e = (kernel[j] - rows[:i, j] @ rows[:i]) / torch.sqrt(dj.clamp(min=tol))
        e = torch.where(dj > tol, e, torch.zeros_like(e))
        rows[i] = e
        d2 -= e * e
        d2[j] = float("-inf")
    return chosen.sort().values


def pivot_deduplication(
    features: torch.Tensor, pivots: torch.Tensor, candidates: torch.Tensor, quota
) -> torch.Tensor:
    """Per pivot, in order, the ``quota`` candidates least similar to it that no earlier pivot took.

    The de-duplication step of DART (Wen et al., EMNLP 2025): each pivot claims the not-yet-chosen
    candidates with the lowest cosine similarity to it (the tokens it duplicates least). Works on
    one sequence (``features [L, D]``, ``pivots [P]``, ``candidates [L]``) or a batch (``[B, L, D]``,
    ``[B, P]``, ``[B, L]``). The cosines of all pivots are one ``[B, P, L]`` product (float32);
    then one masked top-k per pivot (``P`` device steps, no host reads, nothing per token).

    Args:
        features: token features; only the pivots' and candidates' rows are read.
        pivots: slots of the pivots, in the order they choose; ``-1`` marks a missing pivot (it
            picks nothing). A pivot may itself be a candidate of later pivots only if the caller
            leaves it among ``candidates``.
        candidates: which slots may be picked.
        quota: how many each pivot picks: an int, or per pivot (``[P]`` or ``[B, P]``). A pivot
            takes fewer when too few candidates are left.

    Returns:
        Boolean mask of the picked slots (a subset of ``candidates``; pivots not included unless
        picked). Ties go to the earlier slot.

    Example:
        >>> x = torch.tensor([[1.0, 0], [0.9, 0.1], [0, 1], [-1, 0], [0.1, 0.9]])
        >>> cand = torch.tensor([False, True, True, True, True])
        >>> pivot_deduplication(x, torch.tensor([0]), cand, 2).tolist()  # 3 and 2 are farthest from 0
        [False, False, True, True, False]
        >>> pivot_deduplication(x, torch.tensor([0, 2]), cand, 1).tolist()  # 0 takes 3; 2 then takes 1
        [False, True, False, True, False]
    """
    single = features.dim() == 2
    if single:
        features, pivots, candidates = features.unsqueeze(0), pivots.unsqueeze(0), candidates.unsqueeze(0)
    b, p = pivots.shape
    quota = torch.as_tensor(quota, device=pivots.device).long().expand(b, p)
    quota = torch.where(pivots >= 0, quota, torch.zeros_like(quota))
    x = torch.nn.functional.normalize(features.detach().float(), dim=-1)
    anchors = x.gather(1, pivots.clamp(min=0).unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    cos = anchors @ x.transpose(1, 2)  # [B, P, L]
    picked = torch.zeros_like(candidates, dtype=torch.bool)
    for i in range(p):  # a handful of pivots; each step is a masked top-k over the batch
        picked |= topk_mask(-cos[:, i], candidates & ~picked, quota[:, i])
    return picked[0] if single else picked


def _all_or_none(k: int, device) -> torch.Tensor:
    """The answer of a selection asked for no item (empty) or for all ``k`` of them."""
    return torch.arange(k, device=device)
