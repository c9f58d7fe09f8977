"""Causal (or full) attention over packed sequences that kept different token counts.

After pruning, the rows of a batch hold different numbers of tokens. Instead of padding them to
the longest row, pack them: ``q`` [total, H, D], ``k``/``v`` [total, H_kv, D] with sequence s
occupying rows ``cu_seqlens[s]:cu_seqlens[s + 1]``. Within each sequence

    out[i, h] = sum_{j visible} softmax_j(scaling * q[i, h] . k[j, h // (H / H_kv)]) v[j, h // (H / H_kv)]

with j visible iff j <= i (causal) or always (causal=False); fp32 softmax, out in q's dtype.
Rows never attend across sequence boundaries. Differentiable in q, k and v (the backward
recomputes the PyTorch reference). The masked variants for layer skipping
(``visual_window_attention``, ``head_masked_attention``) live in ``visual_attention.py`` and are
re-exported here.
"""

import torch
import torch.nn.functional as F

from ._autograd import upcast
from ._flash import _attend_block, _store_rows
from ._triton import dot_upcast, flash_blocks, last_dim_contiguous, next_pow2, tl, triton
from .dispatch import resolve_backend
from .visual_attention import (  # noqa: F401  (re-exported: same family of ops)
    head_masked_attention,
    head_masked_attention_ref,
    visual_window_attention,
    visual_window_attention_ref,
)

__all__ = ["varlen_attention", "varlen_attention_ref"]

_BLOCKS: tuple[int, int] | None = None  # (BLOCK_M, BLOCK_N) override for tests


@triton.jit
def _varlen_attention_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, cu_ptr, H, G, D, scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    CAUSAL: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Sequence s holds packed rows [cu[s], cu[s+1]). Grid: (cdiv(max_seqlen, BLOCK_M), S, H)."""
    m0 = tl.program_id(0).to(tl.int64) * BLOCK_M
    seq = tl.program_id(1).to(tl.int64)
    h = tl.program_id(2).to(tl.int64)
    start = tl.load(cu_ptr + seq).to(tl.int64)
    n = tl.load(cu_ptr + seq + 1).to(tl.int64) - start
    if m0 >= n:
        return
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_base = q_ptr + start * stride_qt + h * stride_qh
    q = tl.load(
        q_base + offs_m[:, None] * stride_qt + offs_d[None, :],
        mask=(offs_m < n)[:, None] & (offs_d < D)[None, :],
        other=0.0,
    )
    k_base = k_ptr + start * stride_kt + (h // G) * stride_kh
    v_base = v_ptr + start * stride_vt + (h // G) * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = tl.minimum(n, m0 + BLOCK_M) if CAUSAL else n
    for n0 in range(0, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        allowed = (offs_n[None, :] <= offs_m[:, None]) if CAUSAL else (offs_n[None, :] >= 0)
        m_i, l_i, acc = _attend_block(
            q, k_base, v_base, n0, stride_kt, stride_vt, n, D, allowed, m_i, l_i, acc, scale, UPCAST, BLOCK_N, BLOCK_D
        )  # fmt: skip
    _store_rows(o_ptr + start * stride_ot + h * stride_oh, stride_ot, offs_m, n, D, acc, l_i, BLOCK_D)


def _repeat_kv(x: torch.Tensor, heads: int, dim: int) -> torch.Tensor:
    return x.repeat_interleave(heads // x.shape[dim], dim=dim)


def varlen_attention_ref(q, k, v, cu_seqlens, scaling, causal=True) -> torch.Tensor:
    """PyTorch reference of :func:`varlen_attention`: SDPA in fp32 on each sequence."""
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        qs = upcast(q[start:end].transpose(0, 1))
        ks = _repeat_kv(upcast(k[start:end].transpose(0, 1)), q.shape[1], 0)
        vs = _repeat_kv(upcast(v[start:end].transpose(0, 1)), q.shape[1], 0)
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, scale=scaling)
        out[start:end] = o.transpose(0, 1).to(q.dtype)
    return out


def _varlen_triton(q, k, v, cu_seqlens, scaling, causal, max_seqlen):
    q, k, v = last_dim_contiguous(q), last_dim_contiguous(k), last_dim_contiguous(v)
    out = torch.empty_like(q)
    n_seq = cu_seqlens.numel() - 1
    if q.shape[0] == 0 or n_seq == 0 or max_seqlen <= 0:
        return out.zero_()
    heads, dim = q.shape[1], q.shape[2]
    block_m, block_n, warps = flash_blocks(dim, q.dtype, _BLOCKS)
    grid = (triton.cdiv(max_seqlen, block_m), n_seq, heads)
    _varlen_attention_kernel[grid](
        q, k, v, out, cu_seqlens.contiguous(), heads, heads // k.shape[1], dim, scaling,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        CAUSAL=causal, UPCAST=dot_upcast(q.dtype), BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_D=next_pow2(dim, 16), num_warps=warps,
    )  # fmt: skip
    return out


@torch.library.custom_op("vtprune::varlen_attention", mutates_args=())
def _varlen_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
    scaling: float, causal: bool, max_seqlen: int, backend: str,
) -> torch.Tensor:  # fmt: skip
    if backend == "triton":
        return _varlen_triton(q, k, v, cu_seqlens, scaling, causal, max_seqlen)
    return varlen_attention_ref(q, k, v, cu_seqlens, scaling, causal)


@_varlen_op.register_fake
def _(q, k, v, cu_seqlens, scaling, causal, max_seqlen, backend):
    return torch.empty_like(q)


@torch.library.custom_op("vtprune::varlen_attention_backward", mutates_args=())
def _varlen_backward_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, grad: torch.Tensor,
    scaling: float, causal: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Gradients of q, k, v: the reference's vector-Jacobian product. An op of its own because the
    reference splits the packed rows at data-dependent bounds, which torch.compile cannot trace."""
    _, vjp = torch.func.vjp(
        lambda q, k, v: varlen_attention_ref(q, k, v, cu_seqlens, scaling, causal), q, k, v
    )
    return vjp(grad)


@_varlen_backward_op.register_fake
def _(q, k, v, cu_seqlens, grad, scaling, causal):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _varlen_setup(ctx, inputs, output):
    q, k, v, cu_seqlens, scaling, causal, _, _ = inputs
    ctx.save_for_backward(q, k, v, cu_seqlens)
    ctx.scaling, ctx.causal = scaling, causal


def _varlen_backward(ctx, grad):
    q, k, v, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = _varlen_backward_op(q, k, v, cu_seqlens, grad, ctx.scaling, ctx.causal)
    return dq, dk, dv, None, None, None, None, None


_varlen_op.register_autograd(_varlen_backward, setup_context=_varlen_setup)


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    scaling: float,
    causal: bool = True,
    max_seqlen: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Attention within each packed sequence (rows keeping different token counts).

    Args:
        q: [total, H, D]; k, v: [total, H_kv, D] with H % H_kv == 0 (GQA, not repeated).
        cu_seqlens: int32/int64 [S + 1], non-decreasing, cu_seqlens[0] == 0,
            cu_seqlens[-1] == total; sequence s is rows cu_seqlens[s]:cu_seqlens[s + 1].
        scaling: the attention scale.
        causal: row i sees rows j <= i of its own sequence (True) or all of them (False).
        max_seqlen: longest sequence; computed from cu_seqlens (a device sync) when None.
        backend: None/"auto", "triton" or "reference".

    Returns:
        [total, H, D] in q's dtype.

    Example:
        >>> q, k, v = torch.randn(7, 4, 16), torch.randn(7, 2, 16), torch.randn(7, 2, 16)
        >>> varlen_attention(q, k, v, torch.tensor([0, 3, 7]), 0.25).shape
        torch.Size([7, 4, 16])
    """
    if (
        q.dim() != 3
        or k.shape != v.shape
        or k.dim() != 3
        or q.shape[0] != k.shape[0]
        or q.shape[2] != k.shape[2]
    ):
        raise ValueError(
            f"need q [T, H, D], k and v [T, H_kv, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads {q.shape[1]} must be a multiple of key heads {k.shape[1]}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1 or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"cu_seqlens must be int32/int64 [S + 1], got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}"
        )
    if max_seqlen is None:
        max_seqlen = int(cu_seqlens.diff().max()) if cu_seqlens.numel() > 1 else 0
    backend = resolve_backend(q, k, v, cu_seqlens, backend=backend)
    return _varlen_op(q, k, v, cu_seqlens, float(scaling), bool(causal), int(max_seqlen), backend)
