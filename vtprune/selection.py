"""Selection math: pure functions from tensors / numbers to indices, masks and budgets.

Stages call these; nothing here knows about models or hooks.
"""

from __future__ import annotations

import math

import torch

from vtprune.config import check_layer


def topk_mask(scores: torch.Tensor, candidates: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Per row, mark the ``k[b]`` highest-scoring candidate slots.

    Ties break towards the earlier slot, so equal scores give a deterministic choice.

    Example:
        >>> s = torch.tensor([[0.1, 0.9, 0.5, 0.7]])
        >>> topk_mask(s, torch.tensor([[True, True, True, False]]), torch.tensor([2])).tolist()
        [[False, True, True, False]]
    """
    masked = scores.float().masked_fill(~candidates, float("-inf"))
    order = torch.sort(masked, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return (rank < k.to(rank.device).unsqueeze(1)) & candidates


def count_for_fraction(n: torch.Tensor, fraction: float, mode: str = "round") -> torch.Tensor:
    """How many of ``n`` tokens a fraction keeps: ``round`` or ``floor`` (PyramidDrop's ``int``)."""
    x = n.double() * fraction
    out = torch.floor(x + 1e-9) if mode == "floor" else torch.floor(x + 0.5)
    return out.long().clamp(min=0).minimum(n)


def fastv_ratio(keep: float, layer: int, num_layers: int) -> float:
    """Fraction kept from ``layer`` on so that the layer-average keep equals ``keep``.

    Layers ``0..layer-1`` see every token: ``keep = (layer + (L - layer) * ratio) / L``.

    Example:
        >>> round(fastv_ratio(171 / 576, 2, 32), 4)  # FastV K=2 keeping 25%: 171 equivalent tokens
        0.25
    """
    return (keep * num_layers - layer) / (num_layers - layer)


def pyramid_average(layers: list[int], ratio: float, num_layers: int, start: float = 1.0) -> float:
    """Layer-average keep fraction of a pyramid that multiplies by ``ratio`` at each boundary.

    ``start`` is the fraction the layers before the first boundary hold (below 1 when a vision
    stage already removed tokens); no later segment holds more than it.
    """
    bounds = [0, *layers, num_layers]
    return (
        sum((bounds[s + 1] - bounds[s]) * min(start, ratio**s) for s in range(len(bounds) - 1)) / num_layers
    )


def pyramid_ratio(keep: float, layers: list[int], num_layers: int, start: float = 1.0) -> float:
    """Solve ``pyramid_average(layers, ratio, start=start) == keep`` for ratio in (0, 1] by bisection.

    Example:
        >>> round(pyramid_ratio(pyramid_average([8, 16, 24], 0.5, 32), [8, 16, 24], 32), 6)
        0.5
    """
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if pyramid_average(layers, mid, num_layers, start) < keep:
            lo = mid
        else:
            hi = mid
    return hi


def two_stage_fractions(keep: float, layer: int, split: float, num_layers: int) -> tuple[float, float]:
    """``(vision, split)`` for a vision stage followed by one prefill stage at ``layer`` that keeps
    ``split`` of the vision stage's tokens, so the layer average is ``keep``:
    ``keep * L = layer * v + (L - layer) * split * v``. When that needs more than every token
    (``v > 1``), the vision stage keeps everything and the prefill stage keeps the rest.

    Example:
        >>> [round(x, 4) for x in two_stage_fractions(0.111, 16, 1 / 3, 32)]  # VScan's 96 -> 32 of 576
        [0.1665, 0.3333]
        >>> [round(x, 4) for x in two_stage_fractions(0.9, 4, 0.5, 8)]
        [1.0, 0.8]
    """
    vision = keep * num_layers / (layer + split * (num_layers - layer))
    if vision <= 1.0:
        return vision, split
    return 1.0, (keep * num_layers - layer) / (num_layers - layer)


def two_stage_plan(
    method: str, keep: float, layer: int | None, split: float, num_layers: int
) -> tuple[int, float, float]:
    """``(layer, vision fraction, split)`` of a vision stage + prefill stage pair (ToDRE, VScan):
    the prefill layer (default half the depth, checked), then :func:`two_stage_fractions`.

    Example:
        >>> two_stage_plan("todre", 0.25, None, 0.5, 32)
        (16, 0.3333333333333333, 0.5)
    """
    layer = max(1, num_layers // 2) if layer is None else layer
    check_layer(method, "layer", layer, num_layers)
    return (layer, *two_stage_fractions(keep, layer, split, num_layers))


def two_stage_count(
    keep: float, n_prompt: torch.Tensor, n_in: torch.Tensor, layer: int, num_layers: int
) -> torch.Tensor:
    """Tokens a prefill stage at ``layer`` keeps per row so that the layer average is ``keep``,
    for ``n_prompt`` visual tokens in the prompt and ``n_in`` left by the vision stage:
    ``round((keep * N * L - layer * n_in) / (L - layer))``, within ``[0, n_in]`` (the vision
    stage's rounding is absorbed here).

    Example:
        >>> two_stage_count(0.111, torch.tensor([576]), torch.tensor([96]), 16, 32).tolist()
        [32]
    """
    target = (keep * n_prompt.double() * num_layers - layer * n_in.double()) / (num_layers - layer)
    return torch.floor(target + 0.5).long().clamp(min=0).minimum(n_in)


def schedule_average(bounds: list[int], fractions: list[float], num_layers: int) -> float:
    """Layer-average kept fraction when boundary ``bounds[s]`` leaves ``fractions[s]`` of N (every
    layer before the first boundary keeps everything).

    Example:
        >>> schedule_average([7, 9, 12], [0.875, 0.625, 0.125], 32)  # 13.125 / 32
        0.41015625
    """
    edges = [0, *bounds, num_layers]
    held = [1.0, *fractions]
    return sum((edges[i + 1] - edges[i]) * held[i] for i in range(len(held))) / num_layers


def fit_schedule(bounds: list[int], shape: list[float], keep: float, num_layers: int) -> list[float]:
    """``shape`` (the fraction each boundary leaves) scaled by one factor, each clipped at 1, so that
    the layer average (:func:`schedule_average`) is ``keep``: bisection on the factor (SparseVLM's
    and TransPrune's official schedules under a ``keep`` they were not tabulated for).

    Example:
        >>> [round(f, 4) for f in fit_schedule([8, 16], [0.5, 0.25], 0.375, 32)]  # (8 + 8a + 16b) / 32
        [0.25, 0.125]
    """
    lo, hi = 0.0, 1.0 / min(shape)
    for _ in range(60):
        mid = (lo + hi) / 2
        if schedule_average(bounds, [min(1.0, f * mid) for f in shape], num_layers) < keep:
            lo = mid
        else:
            hi = mid
    return [min(1.0, f * hi) for f in shape]


def scale_layers(layers: list[int], num_layers: int, reference_layers: int = 32) -> list[int]:
    """Scale boundaries given for a ``reference_layers``-deep model to ``num_layers``, kept distinct."""
    out: list[int] = []
    for layer in layers:
        x = max(1, min(num_layers - 1, round(layer * num_layers / reference_layers)))
        if out and x <= out[-1]:
            x = out[-1] + 1
        if x < num_layers:
            out.append(x)
    return out


def strided_grid(rows: int, cols: int, k: int) -> torch.Tensor:
    """``k`` cells of a ``rows x cols`` grid spread evenly in 2-D, as row-major indices.

    Picks an ``r x c`` lattice with the grid's aspect ratio and ``r * c >= k``, then keeps ``k``
    lattice points evenly spaced along it.

    Example:
        >>> strided_grid(4, 4, 4).tolist()
        [0, 2, 8, 10]
    """
    n = rows * cols
    k = max(0, min(k, n))
    if k == 0:
        return torch.zeros(0, dtype=torch.long)
    if k == n:
        return torch.arange(n)
    r = max(1, min(rows, round(math.sqrt(k * rows / cols))))
    c = max(1, min(cols, math.ceil(k / r)))
    while r * c < k:
        r = min(rows, r + 1)
        c = max(1, min(cols, math.ceil(k / r)))
    # lattice lines at the start of equal-width strips: a stride, like strided pooling
    rr = torch.div(torch.arange(r) * rows, r, rounding_mode="floor")
    cc = torch.div(torch.arange(c) * cols, c, rounding_mode="floor")
    lattice = (rr.unsqueeze(1) * cols + cc.unsqueeze(0)).flatten()
    pick = torch.div(torch.arange(k) * lattice.numel(), k, rounding_mode="floor")
    return lattice[pick]


def split_budget(total: int, sizes: list[int]) -> list[int]:
    """Split ``total`` over parts in proportion to ``sizes`` (largest remainders), capped by size.

    Example:
        >>> split_budget(5, [4, 4, 2])
        [2, 2, 1]
    """
    s = sum(sizes)
    if s == 0:
        return [0] * len(sizes)
    total = min(total, s)
    exact = [total * x / s for x in sizes]
    out = [min(int(e), x) for e, x in zip(exact, sizes)]
    order = sorted(range(len(sizes)), key=lambda i: exact[i] - int(exact[i]), reverse=True)
    i = 0
    while sum(out) < total:
        j = order[i % len(order)]
        if out[j] < sizes[j]:
            out[j] += 1
        i += 1
    return out


def slots_of(flags: torch.Tensor) -> torch.Tensor:
    """``[B, Q]`` slot indices of the True entries of each row, in order, ``-1`` padded.

    Example:
        >>> slots_of(torch.tensor([[False, True, True], [True, False, False]])).tolist()
        [[1, 2], [0, -1]]
    """
    n = flags.sum(1)
    q = max(1, int(n.max()))
    order = torch.sort(flags.long(), dim=1, descending=True, stable=True).indices[:, :q]
    return torch.where(torch.arange(q, device=flags.device) < n.unsqueeze(1), order, -1)


def allocate(total: int, weights: list[float], caps: list[int]) -> list[int]:
    """Split ``total`` in proportion to ``weights`` (largest remainders), never above ``caps``.

    What a part cannot take (its cap) goes to the others, still by weight.

    Example:
        >>> allocate(10, [3, 1, 0, 0], [4, 10, 10, 10])
        [4, 6, 0, 0]
    """
    out = [0] * len(weights)
    total = min(total, sum(caps))
    active = [i for i, c in enumerate(caps) if c > 0]
    while sum(out) < total:
        w = [float(weights[i]) for i in active]
        if sum(w) <= 0:
            w = [1.0] * len(active)
        for i, share in zip(active, _largest_remainder(total - sum(out), w)):
            out[i] = min(caps[i], out[i] + share)
        active = [i for i in active if out[i] < caps[i]]
    return out


def _largest_remainder(total: int, weights: list[float]) -> list[int]:
    s = float(sum(weights))
    exact = [total * w / s for w in weights]
    out = [int(e) for e in exact]
    order = sorted(range(len(weights)), key=lambda i: exact[i] - out[i], reverse=True)
    for i in order[: total - sum(out)]:
        out[i] += 1
    return out
