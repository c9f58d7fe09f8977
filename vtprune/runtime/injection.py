"""Features added to the visual hidden states between decoder layers (Qwen3-VL's DeepStack).

The text model calls ``inject(hidden_states, visual_pos_masks, visual_embeds)`` after each of
its first few layers, with ``visual_pos_masks`` over the caller's (unpruned) sequence and
``visual_embeds`` one row per visual token in row-major order of that mask. Once tokens are gone
the mask no longer matches the hidden states, so the shadowed method hands the model's own
implementation the mask of the tokens the layer really holds and only their feature rows: the
same indices that dropped the tokens' embeddings (vision stages) or hidden states (prefill
stages) drop their features.
"""

from __future__ import annotations

import torch

from .state import ACTIVE
from .tokens import TokenSet


def kept_rows(mask: torch.Tensor, token_set: TokenSet) -> tuple[torch.Tensor, torch.Tensor]:
    """The mask over ``token_set``'s slots and, per visual slot kept, its row in the features.

    Args:
        mask: ``[B, N]`` bool over the original sequence (the features' row-major order).
        token_set: the tokens a layer holds (``orig_index`` into the original sequence).

    Returns:
        ``(mask [B, M], rows [k])``: the visual slots present in the set, and the feature row of
        each, in row-major order of the new mask (the order the model adds them in).

    Example:
        >>> from vtprune.runtime.tokens import TokenSet
        >>> mask = torch.tensor([[False, True, True, True]])
        >>> orig = torch.tensor([[0, 1, 3]])  # slot 2 (the second visual token) was dropped
        >>> ones = torch.ones_like(orig, dtype=torch.bool)
        >>> ts = TokenSet(0, orig, orig, ones, ones, mask.gather(1, orig))
        >>> new, rows = kept_rows(mask, ts)
        >>> new.tolist(), rows.tolist()
        ([[False, True, True]], [0, 2])
    """
    idx = token_set.orig_index.clamp(min=0).to(mask.device)
    rank = (mask.flatten().long().cumsum(0) - 1).view_as(mask)
    new = mask.gather(1, idx) & token_set.present.to(mask.device)
    return new, rank.gather(1, idx)[new]


def wrap_injection(method, is_mine):
    """Shadow the text model's injection ``method`` so that, while a pruned prefill runs, it adds
    only the kept tokens' features at their kept slots; otherwise it runs unchanged."""

    def inject(hidden_states, visual_pos_masks, visual_embeds):
        state = ACTIVE.get()
        if is_mine(state) and state.prefilling and state.sets and visual_pos_masks is not None:
            # layers run in order and each stage appends its set before its layer runs, so the
            # newest set is the one whose hidden states this call receives
            s = len(state.sets) - 1
            current = state.sets[s]
            if s > 0 or current.length != visual_pos_masks.shape[1]:  # else nothing was dropped
                mask, rows = state.cached(("injection", s), lambda: kept_rows(visual_pos_masks, current))
                visual_pos_masks, visual_embeds = mask, visual_embeds[rows.to(visual_embeds.device)]
        return method(hidden_states, visual_pos_masks, visual_embeds)

    inject.__wrapped__ = method
    return inject
