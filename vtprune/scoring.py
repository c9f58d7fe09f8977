"""Attention scores computed beside the model's attention backend (rule 5: no eager switch).

The few probability rows a method needs (the last query, the text queries, the tokens before
an answer) are recomputed from a layer's own norm, q/k projections and rotary tables: O(H*Q*L*D)
work instead of materialising the whole attention matrix in eager mode. Scores only choose
which tokens survive, so they are computed without autograd (a training forward stays
differentiable through the kept tokens, never through the choice).
"""

from __future__ import annotations

import torch
from torch import nn

import vtprune.kernels as kernels


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding as Llama/Qwen2 apply it: ``x [B, H, L, D]``, ``cos/sin [B, L, D]``."""
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)


def _gather_rows(x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    return x.gather(1, slots.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


@torch.no_grad()
def head_norms(
    attn: nn.Module, q: torch.Tensor | None, k: torch.Tensor
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Queries and keys ``[B, H, L, head_dim]`` through the attention's per-head norms where it has
    them (Qwen3 decoders: ``q_norm`` / ``k_norm``, RMSNorm over ``head_dim`` before RoPE), as the
    layer's own forward does; unchanged otherwise (LLaMA, Qwen2). ``q`` may be ``None`` (keys only).

    Example:
        >>> q, k = torch.ones(1, 2, 3, 4), torch.ones(1, 1, 3, 4)
        >>> head_norms(torch.nn.Module(), q, k)[0] is q
        True
    """
    q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
    return (q if q_norm is None or q is None else q_norm(q)), (k if k_norm is None else k_norm(k))


def layer_query_probs(
    layer: nn.Module,
    hidden: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    valid: torch.Tensor,
    query_slots: torch.Tensor,
) -> torch.Tensor:
    """Attention probabilities of chosen query rows at decoder ``layer``, mean over heads.

    Args:
        layer: a decoder layer (``input_layernorm`` + ``self_attn`` with q/k projections).
        hidden: the layer's input ``[B, L, D]``.
        cos, sin: rotary tables at these slots ``[B or 1, L, head_dim]``.
        valid: ``[B, L]`` slots that may be attended (padding excluded).
        query_slots: ``[B, Q]`` slot of each query row; ``-1`` marks a missing query (all zeros out).

    Returns:
        ``[B, Q, L]`` float32 probabilities (causal: key ``j`` visible to query ``i`` iff ``j <= i``).

    Example:
        >>> # probs = layer_query_probs(model.model.language_model.layers[1], h, cos, sin, valid, last)
    """
    attn = layer.self_attn
    b, n, _ = hidden.shape
    hd = attn.head_dim
    cos, sin = cos.expand(b, -1, -1), sin.expand(b, -1, -1)
    qs = query_slots.clamp(min=0)
    normed = layer.input_layernorm(hidden)
    q = attn.q_proj(_gather_rows(normed, qs)).view(b, qs.shape[1], -1, hd).transpose(1, 2)
    k = attn.k_proj(normed).view(b, n, -1, hd).transpose(1, 2)
    q, k = head_norms(attn, q, k)
    q = apply_rope(q, _gather_rows(cos, qs), _gather_rows(sin, qs))
    k = apply_rope(k, cos, sin)
    query_pos = query_slots.masked_fill(query_slots < 0, -1)
    return kernels.query_key_probs(q, k, valid, query_pos, attn.scaling)


@torch.no_grad()
def projected_query_probs(
    attn: nn.Module,
    q_out: torch.Tensor,
    k_out: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    valid: torch.Tensor,
    query_slots: torch.Tensor,
) -> torch.Tensor:
    """:func:`layer_query_probs` from a layer's own q/k projection outputs (no recomputation).

    ``q_out [B, L, H*D]`` and ``k_out [B, L, H_kv*D]`` are what ``attn.q_proj`` / ``attn.k_proj``
    produced for the same slots; rotary tables are applied here, to the query rows only.
    """
    b, n, _ = k_out.shape
    hd = attn.head_dim
    cos, sin = cos.expand(b, -1, -1), sin.expand(b, -1, -1)
    qs = query_slots.clamp(min=0)
    q = _gather_rows(q_out, qs).view(b, qs.shape[1], -1, hd).transpose(1, 2)
    k = k_out.view(b, n, -1, hd).transpose(1, 2)
    q, k = head_norms(attn, q, k)
    q = apply_rope(q, _gather_rows(cos, qs), _gather_rows(sin, qs))
    k = apply_rope(k, cos, sin)
    return kernels.query_key_probs(q, k, valid, query_slots, attn.scaling)


def hub_attention(probs: torch.Tensor, threshold: float) -> torch.Tensor:
    """VFlowOpt's importance: each key's attention from the hub tokens of one attention map.

    ``probs`` ``[H, T, T]`` (queries x keys, rows sum to 1) is averaged over heads to ``A``; a
    token's received attention is its column mean, the hubs are the tokens receiving more than
    ``threshold`` times the mean of that (the most-attended token when none does), and the score
    of key ``j`` is the mean of ``A[i, j]`` over the hub queries ``i``.

    Example:
        >>> p = torch.tensor([[[0.1, 0.9], [0.2, 0.8]]])  # token 1 receives the most
        >>> hub_attention(p, threshold=1.2).tolist()  # its own row only
        [0.20000000298023224, 0.800000011920929]
    """
    a = probs.float().mean(0)
    received = a.mean(0)
    hubs = received > threshold * received.mean()
    hubs = torch.where(hubs.any(), hubs, received == received.max())  # no host read
    weights = hubs.float() / hubs.float().sum()
    return weights @ a
