"""Attention probabilities for pruning scores, without materialising the attention matrix.

With s[b,h,i,j] = scaling * q[b,h,i] . k[b, h // (H / H_kv), j] (GQA heads share K, never
repeated in memory) and the visibility rule

    visible(b, i, j) = key_valid[b, j] and j <= pos(b, i)        (pos < 0: query is padding)

the probability is p[b,h,i,j] = exp(s - lse[b,h,i]) for visible keys (0 otherwise), with
lse[b,h,i] = log sum_{visible j} exp(s[b,h,i,j]) computed in fp32. A query with no visible key
has p = 0 everywhere. Both kernels make two passes: the first streams keys to get lse (online
max/sum, O(1) state per query), the second recomputes s block by block and reduces p.

- ``query_key_probs``: mean over heads of p for a few query rows -> [B, Q, L or key range].
- ``key_attention_colsum``: mean over heads of sum over queries of p -> [B, L] (how much
  attention each key receives, e.g. FastV / PyramidDrop style scores over many queries).

Scores choose which tokens survive; they are not differentiated (compute them under
``torch.no_grad()``). A backward through either op raises a RuntimeError saying so.
"""

import torch

from ._autograd import register_no_backward
from ._flash import _dot, _lse_finish, _online_softmax_step
from ._triton import dot_upcast, last_dim_contiguous, next_pow2, tl, triton
from .dispatch import resolve_backend

__all__ = ["query_key_probs", "query_key_probs_ref", "key_attention_colsum", "key_attention_colsum_ref"]


@triton.jit
def _masked_scores(q, k_base, valid_base, qpos, n0, L, D, stride_kl, scale, UPCAST, BLOCK_N, BLOCK_D):
    """fp32 scores of the query tile onto keys [n0, n0 + BLOCK_N), -inf where not visible."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    in_range = offs_n < L
    kt = tl.load(
        k_base + offs_n[None, :] * stride_kl + offs_d[:, None],
        mask=in_range[None, :] & (offs_d[:, None] < D),
        other=0.0,
    )
    kv = tl.load(valid_base + offs_n, mask=in_range, other=0)
    visible = (kv != 0)[None, :] & (offs_n[None, :] <= qpos[:, None])
    return tl.where(visible, _dot(q, kt, UPCAST) * scale, float("-inf"))


@triton.jit
def _finite(lse):
    """A query with no visible key has lse = -inf and all scores -inf: map lse to 0 so that
    exp(s - lse) is exp(-inf) = 0 rather than NaN."""
    return tl.where(lse == float("-inf"), 0.0, lse)


@triton.jit
def _load_queries(q_ptr, qpos_ptr, m0, Q, D, stride_qm, BLOCK_M, BLOCK_D):
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = tl.load(
        q_ptr + offs_m[:, None] * stride_qm + offs_d[None, :],
        mask=(offs_m[:, None] < Q) & (offs_d[None, :] < D),
        other=0.0,
    )
    qpos = tl.load(qpos_ptr + offs_m, mask=offs_m < Q, other=-1)
    return q, qpos, offs_m


@triton.jit
def _attention_lse_kernel(
    q_ptr, k_ptr, valid_ptr, qpos_ptr, lse_ptr, H, G, Q, L, D, scale,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kl, stride_vb, stride_pb,
    UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """lse[b, h, i] = log sum_{visible j} exp(s[b, h, i, j]). Grid: (B*H, cdiv(Q, BLOCK_M))."""
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H
    h = bh % H
    m0 = tl.program_id(1).to(tl.int64) * BLOCK_M
    q, qpos, offs_m = _load_queries(
        q_ptr + b * stride_qb + h * stride_qh, qpos_ptr + b * stride_pb, m0, Q, D, stride_qm, BLOCK_M, BLOCK_D
    )
    k_base = k_ptr + b * stride_kb + (h // G) * stride_kh
    valid_row = valid_ptr + b * stride_vb
    hi = tl.minimum(tl.max(qpos, 0) + 1, L)  # causal: no query of the tile sees past this
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    for n0 in range(0, hi, BLOCK_N):
        s = _masked_scores(q, k_base, valid_row, qpos, n0, L, D, stride_kl, scale, UPCAST, BLOCK_N, BLOCK_D)
        _, _, m_i, l_i = _online_softmax_step(s, m_i, l_i)
    tl.store(lse_ptr + bh * Q + offs_m, _lse_finish(m_i, l_i), mask=offs_m < Q)


@triton.jit
def _query_key_probs_kernel(
    q_ptr, k_ptr, valid_ptr, qpos_ptr, lse_ptr, out_ptr, H, G, Q, L, D, R, key_start, scale,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kl, stride_vb, stride_pb,
    UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """out[b, i, j - key_start] = mean_h p[b, h, i, j]. Grid: (B*cdiv(Q, BLOCK_M), cdiv(R, BLOCK_N))."""
    q_blocks = tl.cdiv(Q, BLOCK_M)
    b = tl.program_id(0).to(tl.int64) // q_blocks
    m0 = (tl.program_id(0).to(tl.int64) % q_blocks) * BLOCK_M
    n0 = key_start + tl.program_id(1).to(tl.int64) * BLOCK_N
    valid_row = valid_ptr + b * stride_vb
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for h in range(0, H):
        q_head = q_ptr + b * stride_qb + h * stride_qh
        q, qpos, offs_m = _load_queries(
            q_head, qpos_ptr + b * stride_pb, m0, Q, D, stride_qm, BLOCK_M, BLOCK_D
        )
        lse = tl.load(lse_ptr + (b * H + h) * Q + offs_m, mask=offs_m < Q, other=float("-inf"))
        k_base = k_ptr + b * stride_kb + (h // G) * stride_kh
        s = _masked_scores(q, k_base, valid_row, qpos, n0, L, D, stride_kl, scale, UPCAST, BLOCK_N, BLOCK_D)
        acc += tl.exp(s - _finite(lse)[:, None])
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_r = n0 - key_start + tl.arange(0, BLOCK_N)
    mask = (offs_m[:, None] < Q) & (offs_r[None, :] < R)
    tl.store(out_ptr + (b * Q + offs_m[:, None]) * R + offs_r[None, :], acc / H, mask=mask)


@triton.jit
def _key_colsum_kernel(
    q_ptr, k_ptr, valid_ptr, qpos_ptr, lse_ptr, out_ptr, H, G, Q, L, D, q_offset, scale,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kl, stride_vb, stride_pb,
    UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """out[b, h, j] = sum_i p[b, h, i, j], query i at position q_offset + i. Grid: (B*H, cdiv(L, BLOCK_N))."""
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H
    h = bh % H
    n0 = tl.program_id(1).to(tl.int64) * BLOCK_N
    k_base = k_ptr + b * stride_kb + (h // G) * stride_kh
    valid_row = valid_ptr + b * stride_vb
    acc = tl.zeros([BLOCK_N], tl.float32)
    # Causal: queries before position n0 see none of these keys; start at the first tile that can.
    m_start = (tl.maximum(n0 - q_offset, 0) // BLOCK_M) * BLOCK_M
    q_head = q_ptr + b * stride_qb + h * stride_qh
    for m0 in range(m_start, Q, BLOCK_M):
        q, qpos, offs_m = _load_queries(
            q_head, qpos_ptr + b * stride_pb, m0, Q, D, stride_qm, BLOCK_M, BLOCK_D
        )
        lse = tl.load(lse_ptr + bh * Q + offs_m, mask=offs_m < Q, other=float("-inf"))
        s = _masked_scores(q, k_base, valid_row, qpos, n0, L, D, stride_kl, scale, UPCAST, BLOCK_N, BLOCK_D)
        acc += tl.sum(tl.exp(s - _finite(lse)[:, None]), 0)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    tl.store(out_ptr + bh * L + offs_n, acc, mask=offs_n < L)


def _visible(key_valid: torch.Tensor, query_pos: torch.Tensor) -> torch.Tensor:
    """[B, Q, L] bool: key j visible to query i (the semantics of this module)."""
    j = torch.arange(key_valid.shape[1], device=key_valid.device)
    return key_valid[:, None, :] & (j[None, None, :] <= query_pos[:, :, None])


def _probs_ref(q, k, key_valid, query_pos, scaling) -> torch.Tensor:
    """Dense fp32 probabilities [B, H, Q, L]; rows with no visible key are 0."""
    kr = k.float().repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    s = (q.float() @ kr.transpose(-1, -2)) * scaling
    s = s.masked_fill(~_visible(key_valid, query_pos)[:, None], float("-inf"))
    return torch.softmax(s, dim=-1).nan_to_num(0.0)


def query_key_probs_ref(q, k, key_valid, query_pos, scaling, key_range=None) -> torch.Tensor:
    """PyTorch reference of :func:`query_key_probs` (dense softmax in fp32)."""
    start, end = key_range if key_range is not None else (0, k.shape[2])
    return _probs_ref(q, k, key_valid, query_pos, scaling).mean(1)[..., start:end].contiguous()


def _key_colsum_query_pos(key_valid: torch.Tensor, query_valid: torch.Tensor) -> torch.Tensor:
    """Queries are the last Lq positions; invalid ones get position -1 (they see nothing)."""
    length, lq = key_valid.shape[1], query_valid.shape[1]
    pos = torch.arange(length - lq, length, device=key_valid.device).expand(key_valid.shape[0], lq)
    return torch.where(query_valid, pos, -1)


def key_attention_colsum_ref(q, k, key_valid, query_valid, scaling) -> torch.Tensor:
    """PyTorch reference of :func:`key_attention_colsum` (dense softmax in fp32)."""
    query_pos = _key_colsum_query_pos(key_valid, query_valid)
    return _probs_ref(q, k, key_valid, query_pos, scaling).sum(2).mean(1)


def _launch(kernel, grid, q, k, valid, qpos, lse, extra_ptrs, extra_args, scaling, block_m, block_n):
    # The second-pass kernels hold an extra [M, N] fp32 tile: 8 warps keep them spill-free on sm_90.
    warps = 4 if kernel is _attention_lse_kernel else 8
    b, h, nq, d = q.shape
    kernel[grid](
        q, k, valid, qpos, lse, *extra_ptrs, h, h // k.shape[1], nq, k.shape[2], d, *extra_args, scaling,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        valid.stride(0), qpos.stride(0), UPCAST=dot_upcast(q.dtype),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=next_pow2(d, 16), num_warps=warps,
    )  # fmt: skip


_BLOCKS: tuple[int, int] | None = None  # (BLOCK_M, BLOCK_N) override; tests use small blocks


def _blocks(nq: int) -> tuple[int, int]:
    if _BLOCKS is not None:
        return _BLOCKS
    return min(next_pow2(nq, 16), 64), 64  # tl.dot needs >= 16 rows; Q is often 1 here


def _lse_triton(q, k, valid, qpos, scaling) -> torch.Tensor:
    b, h, nq, _ = q.shape
    lse = torch.empty((b, h, nq), dtype=torch.float32, device=q.device)
    block_m, block_n = _blocks(nq)
    grid = (b * h, triton.cdiv(nq, block_m))
    _launch(_attention_lse_kernel, grid, q, k, valid, qpos, lse, (), (), scaling, block_m, block_n)
    return lse


def _prepare(q, k, key_valid, query_pos):
    q, k = last_dim_contiguous(q), last_dim_contiguous(k)
    return q, k, key_valid.contiguous().view(torch.uint8), query_pos.contiguous()


@torch.library.custom_op("vtprune::query_key_probs", mutates_args=())
def _query_key_probs_op(
    q: torch.Tensor, k: torch.Tensor, key_valid: torch.Tensor, query_pos: torch.Tensor,
    scaling: float, key_start: int, key_end: int, backend: str,
) -> torch.Tensor:  # fmt: skip
    if backend != "triton":
        return query_key_probs_ref(q, k, key_valid, query_pos, scaling, (key_start, key_end))
    q, k, valid, qpos = _prepare(q, k, key_valid, query_pos)
    b, _, nq, _ = q.shape
    out = torch.zeros((b, nq, key_end - key_start), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out
    lse = _lse_triton(q, k, valid, qpos, scaling)
    block_m, block_n = _blocks(nq)
    grid = (b * triton.cdiv(nq, block_m), triton.cdiv(key_end - key_start, block_n))
    args = (key_end - key_start, key_start)
    _launch(_query_key_probs_kernel, grid, q, k, valid, qpos, lse, (out,), args, scaling, block_m, block_n)
    return out


@_query_key_probs_op.register_fake
def _(q, k, key_valid, query_pos, scaling, key_start, key_end, backend):
    return q.new_empty((q.shape[0], q.shape[2], key_end - key_start), dtype=torch.float32)


_NO_GRAD_WHY = "pruning scores select tokens and are not differentiated; compute them under torch.no_grad()"
register_no_backward(_query_key_probs_op, "query_key_probs", _NO_GRAD_WHY)


def _check_qk(q: torch.Tensor, k: torch.Tensor, key_valid: torch.Tensor | None) -> torch.Tensor:
    if q.dim() != 4 or k.dim() != 4 or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"need q [B, H, Q, D] and k [B, H_kv, L, D], got {tuple(q.shape)}, {tuple(k.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads {q.shape[1]} must be a multiple of key heads {k.shape[1]}")
    if key_valid is None:
        return torch.ones(k.shape[0], k.shape[2], dtype=torch.bool, device=k.device)
    if key_valid.shape != (k.shape[0], k.shape[2]) or key_valid.dtype != torch.bool:
        raise ValueError(
            f"key_valid must be bool [B, L] = {(k.shape[0], k.shape[2])}, got {key_valid.dtype} {tuple(key_valid.shape)}"
        )
    return key_valid


def query_key_probs(
    q: torch.Tensor,
    k: torch.Tensor,
    key_valid: torch.Tensor | None,
    query_pos: torch.Tensor,
    scaling: float,
    key_range: tuple[int, int] | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Softmax probabilities of a few query rows onto the keys, averaged over heads.

    Args:
        q: [B, H, Q, D] queries (post-RoPE), Q small (the last token, the text tokens).
        k: [B, H_kv, L, D] keys (post-RoPE, e.g. a cache layer); H % H_kv == 0 (GQA).
        key_valid: bool [B, L], False for padding keys; None means all valid.
        query_pos: int64 [B, Q], sequence index of each query: key j is visible iff
            j <= query_pos and key_valid; a negative position marks a padding query (all 0).
        scaling: the attention scale (usually head_dim ** -0.5).
        key_range: optional (start, end): return only key columns [start, end), still
            normalised over every visible key.
        backend: None/"auto", "triton" or "reference".

    Returns:
        fp32 [B, Q, L] (or [B, Q, end - start]): mean over the H query heads of the softmax.

    Example:
        >>> q, k = torch.randn(1, 4, 1, 8), torch.randn(1, 2, 6, 8)
        >>> p = query_key_probs(q, k, None, torch.tensor([[5]]), 8**-0.5)
        >>> p.shape, round(float(p.sum()), 4)
        (torch.Size([1, 1, 6]), 1.0)
    """
    key_valid = _check_qk(q, k, key_valid)
    if query_pos.shape != q.shape[:1] + q.shape[2:3] or query_pos.dtype != torch.int64:
        raise ValueError(f"query_pos must be int64 [B, Q], got {query_pos.dtype} {tuple(query_pos.shape)}")
    start, end = key_range if key_range is not None else (0, k.shape[2])
    if not 0 <= start <= end <= k.shape[2]:
        raise ValueError(f"key_range must satisfy 0 <= start <= end <= {k.shape[2]}, got {key_range}")
    backend = resolve_backend(q, k, key_valid, query_pos, backend=backend)
    return _query_key_probs_op(q, k, key_valid, query_pos, float(scaling), int(start), int(end), backend)


@torch.library.custom_op("vtprune::key_attention_colsum", mutates_args=())
def _key_colsum_op(
    q: torch.Tensor,
    k: torch.Tensor,
    key_valid: torch.Tensor,
    query_valid: torch.Tensor,
    scaling: float,
    backend: str,
) -> torch.Tensor:
    if backend != "triton":
        return key_attention_colsum_ref(q, k, key_valid, query_valid, scaling)
    qpos = _key_colsum_query_pos(key_valid, query_valid)
    q, k, valid, qpos = _prepare(q, k, key_valid, qpos)
    b, h, nq, _ = q.shape
    length = k.shape[2]
    if b * nq * length == 0:
        return torch.zeros((b, length), dtype=torch.float32, device=q.device)
    lse = _lse_triton(q, k, valid, qpos, scaling)
    per_head = torch.empty((b, h, length), dtype=torch.float32, device=q.device)
    block_m, block_n = _blocks(nq)
    grid = (b * h, triton.cdiv(length, block_n))
    args = (length - nq,)
    _launch(_key_colsum_kernel, grid, q, k, valid, qpos, lse, (per_head,), args, scaling, block_m, block_n)
    return per_head.mean(1)


@_key_colsum_op.register_fake
def _(q, k, key_valid, query_valid, scaling, backend):
    return q.new_empty((k.shape[0], k.shape[2]), dtype=torch.float32)


register_no_backward(_key_colsum_op, "key_attention_colsum", _NO_GRAD_WHY)


def key_attention_colsum(
    q: torch.Tensor,
    k: torch.Tensor,
    key_valid: torch.Tensor | None,
    query_valid: torch.Tensor | None,
    scaling: float,
    backend: str | None = None,
) -> torch.Tensor:
    """Attention each key receives, summed over queries and averaged over heads (causal).

    Args:
        q: [B, H, Lq, D] queries at the last Lq positions (Lq == L for a full prefill).
        k: [B, H_kv, L, D] keys, H % H_kv == 0.
        key_valid: bool [B, L], False for padding; None means all valid.
        query_valid: bool [B, Lq], which queries contribute; None means key_valid[:, -Lq:].
        scaling: the attention scale.
        backend: None/"auto", "triton" or "reference".

    Returns:
        fp32 [B, L]: out[b, j] = mean_h sum_i p[b, h, i, j], each query's softmax normalised
        over its own visible keys (j <= its position, key_valid). A sum, not a mean over
        queries: divide by the number of valid queries for an average. Extra memory is
        O(B * H * (L + Lq)); the [Lq, L] matrix is never stored.

    Example:
        >>> q, k = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
        >>> c = key_attention_colsum(q, k, None, None, 8**-0.5)
        >>> c.shape, round(float(c.sum()), 4)  # every query's probabilities sum to 1
        (torch.Size([1, 5]), 5.0)
    """
    key_valid = _check_qk(q, k, key_valid)
    if q.shape[2] > k.shape[2]:
        raise ValueError(f"more queries ({q.shape[2]}) than keys ({k.shape[2]})")
    if query_valid is None:
        query_valid = key_valid[:, k.shape[2] - q.shape[2] :]
    if query_valid.shape != (q.shape[0], q.shape[2]) or query_valid.dtype != torch.bool:
        raise ValueError(
            f"query_valid must be bool [B, Lq], got {query_valid.dtype} {tuple(query_valid.shape)}"
        )
    backend = resolve_backend(q, k, key_valid, query_valid, backend=backend)
    return _key_colsum_op(q, k, key_valid, query_valid, float(scaling), backend)
