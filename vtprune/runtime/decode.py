"""Decode-time work of the runtime: masks over pruned caches and MustDrop-style cache re-indexing.

At a decode step each layer's KV cache holds the token set it kept at prefill plus the tokens
generated since; the caller's 2-D mask covers the original prompt, so it is re-indexed per
token set. Decode stages shrink earlier layers' caches to the final set once, after prefill.
"""

from __future__ import annotations

import torch

import vtprune.kernels as kernels
from vtprune import compat

from .plumbing import slots_within
from .state import RequestState
from .tokens import TokenSet, compact


def decode_mask2d(state: RequestState, token_set: TokenSet, hidden, cache, layer_idx: int) -> torch.Tensor:
    """The caller's 2-D mask re-indexed onto the cache of a layer holding ``token_set``."""
    tail = state.step.decode_tail
    if tail is None:
        decoded = cache.layers[layer_idx].get_seq_length() - token_set.length
        tail = torch.ones(state.batch, decoded + hidden.shape[1], dtype=torch.bool, device=hidden.device)
    return torch.cat([token_set.valid.to(tail.device), tail], dim=1).long()


def remap_lm_mask(state: RequestState, args, kwargs):
    """Language-model pre-hook at decode: the caller's mask onto layer 0's (possibly pruned) cache."""
    mask2d = kwargs.get("attention_mask")
    if mask2d is not None and (isinstance(mask2d, dict) or mask2d.dim() != 2):
        raise NotImplementedError("vtprune: pre-built 4-D / per-layer-type attention masks are not supported")
    if mask2d is not None:
        state.step.decode_tail = mask2d[:, state.orig_len :].bool()
    first = state.sets[state.layer_set[0]]  # a per-layer KV stage may have shortened layer 0 too
    if first.length == state.orig_len and not first.has_padding:
        return None
    cache = compat.get_cache(kwargs)
    kwargs["attention_mask"] = decode_mask2d(state, first, kwargs["inputs_embeds"], cache, 0)
    return args, kwargs


def layer_mask(state: RequestState, text_config, i: int, args, kwargs):
    """Decoder-layer pre-hook at decode: the attention mask of the token set layer ``i`` holds."""
    s = state.layer_set[i]
    if s == 0:
        return None
    if s not in state.step.masks:
        hidden = args[0] if args else kwargs["hidden_states"]
        cache = compat.get_cache(kwargs)
        mask2d = decode_mask2d(state, state.sets[s], hidden, cache, i)
        state.step.masks[s] = compat.causal_mask(text_config, hidden, mask2d, cache, layer_idx=i)
    kwargs["attention_mask"] = state.step.masks[s]
    return args, kwargs


def reindex_caches(state: RequestState, decode_stages, cache) -> None:
    """Re-index the caches of later layers to the final token set (gathered per layer)."""
    final_idx = len(state.sets) - 1
    final = state.sets[final_idx]
    for stage in decode_stages:
        if not stage.reindex:
            continue
        for i in range(stage.first_layer, len(state.layer_set)):
            s = state.layer_set[i]
            if s == final_idx:
                continue
            layer = cache.layers[i]
            idx = slots_within(state.sets[s], final).to(layer.keys.device)
            layer.keys, layer.values = kernels.gather_rows([layer.keys, layer.values], idx)
            state.layer_set[i] = final_idx


def compact_layer_caches(state: RequestState, layer_keep: dict[int, torch.Tensor], cache) -> None:
    """Shorten each listed layer's KV cache to its own kept slots (a per-layer token set each).

    ``layer_keep[i]`` is boolean ``[B, M_i]`` over the slots of the set layer ``i`` holds; rows
    keeping different counts are left-padded like any compacted set, so the decode masks built
    per token set cover them.
    """
    for i, keep in sorted(layer_keep.items()):
        cur = state.sets[state.layer_set[i]]
        keep = keep.to(cur.present.device) & cur.present
        if bool(keep.eq(cur.present).all()):
            continue
        slots, present = compact(keep)
        state.sets.append(cur.select(slots, present, i))
        state.layer_set[i] = len(state.sets) - 1
        layer = cache.layers[i]
        index = torch.where(present, slots, -1).to(layer.keys.device)
        layer.keys, layer.values = kernels.gather_rows([layer.keys, layer.values], index)
