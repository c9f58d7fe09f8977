"""Per-layer KV budgets from one global cumulative-importance level (PrefixKV's rule).

Each layer ``l`` has an importance per cached position (the attention it received, summed
over queries, mean over heads). Sorted high to low and normalised, its cumulative sum says
how many of the most important positions hold a share ``p`` of the layer's attention. One
level ``p`` is shared by every layer, so a layer whose attention is concentrated keeps few
positions and a diffuse one keeps many; ``p`` is found by bisection so that the layers
together evict ``(1 - keep)`` of all positions, then the counts are rescaled to that target
exactly (floored), as the official profiler does.

The protected positions (the first ``sink`` and the last one) are never counted as evictable.
"""

from __future__ import annotations

import torch

TOLERANCE = 5  # positions: the official bisection stops once the total is this close
MAX_STEPS = 64  # the official loop has no cap; floats stop halving long before this


def forget_counts(scores: list[torch.Tensor], keep: float, protect: int) -> list[int]:
    """Positions each layer evicts so all layers together keep ``keep`` of their positions.

    Args:
        scores: one 1-D tensor per layer, the importance of each of its ``n_l`` positions.
        keep: the global fraction of positions kept, in (0, 1].
        protect: positions of every layer that are never evicted (first tokens + last token).

    Returns:
        per layer, the number of (unprotected) positions to evict.

    Example:
        >>> flat, peaked = torch.ones(10), torch.tensor([9.0] + [0.1] * 9)
        >>> forget_counts([flat, peaked], keep=0.5, protect=0)  # the peaked layer gives up more
        [3, 6]
    """
    sizes = torch.tensor([s.numel() for s in scores], dtype=torch.float64)
    target = float((1.0 - keep) * sizes.sum())
    if target <= 0:
        return [0] * len(scores)
    cdfs = []
    for s in scores:
        ordered = s.double().sort(descending=True).values
        cdfs.append((ordered / ordered.sum().clamp(min=1e-300)).cumsum(0))

    def counts(level: float) -> torch.Tensor:
        # positions needed to reach ``level`` of the layer's mass, then what is left to evict
        held = torch.tensor([int(torch.searchsorted(c, level)) + 1 for c in cdfs], dtype=torch.float64)
        return (sizes - held - protect).clamp(min=0)

    low, high, level = 0.0, 1.0, 0.5
    for _ in range(MAX_STEPS):
        level = (low + high) / 2
        total = float(counts(level).sum())
        if abs(total - target) < TOLERANCE:
            break
        if total < target:
            high = level
        else:
            low = level
    forget = counts(level)
    if forget.sum() > 0:
        forget = forget * target / forget.sum()
    # the rescale may ask a layer for more than it can give (its protected positions stay)
    limit = (sizes - protect).clamp(min=0)
    return [int(f) for f in torch.minimum(forget.floor(), limit).tolist()]


def evict(scores: torch.Tensor, valid: torch.Tensor, forget: int, sink: int) -> torch.Tensor:
    """Which slots of one row stay: all but the ``forget`` least important evictable ones.

    Args:
        scores: ``[M]`` importance per slot.
        valid: ``[M]`` bool, real slots of the row (padding is never kept).
        forget: how many to evict (capped at the evictable count).
        sink: the first ``sink`` real slots are protected, and so is the last real slot.

    Returns:
        ``[M]`` bool, the slots kept (ties are broken towards evicting the earlier slot).

    Example:
        >>> evict(torch.tensor([5.0, 1, 3, 0, 2, 9]), torch.ones(6, dtype=torch.bool), 2, 1).tolist()
        [True, False, True, False, True, True]
    """
    real = torch.nonzero(valid).flatten()
    kept = valid.clone()
    middle = real[sink : max(real.numel() - 1, sink)]
    forget = max(0, min(int(forget), middle.numel()))
    if forget:
        order = torch.sort(scores[middle].float(), stable=True).indices
        kept[middle[order[:forget]]] = False
    return kept
