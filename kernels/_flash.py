"""Triton helpers shared by the attention kernels: a precision-aware dot and the online softmax.

Both are inlined into the calling kernels. ``UPCAST`` (see ``_triton.dot_upcast``) selects an
IEEE fp32 dot on upcast operands; otherwise fp16/bf16 operands go to tensor cores with fp32
accumulation.
"""

from ._triton import tl, triton


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr):
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _online_softmax_step(s, m_i, l_i):
    """One key block of the streaming log-sum-exp.

    ``s`` [M, N] fp32 scores with masked entries at -inf; ``m_i``/``l_i`` [M] running max and
    sum of exp(s - m_i). Returns (p, alpha, m_new, l_new): p = exp(s - m_new) and alpha, the
    factor that rescales earlier partial sums. A row with nothing visible yet keeps m = -inf,
    p = alpha = 0 (no NaN from -inf - -inf).
    """
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp(s - m_safe[:, None])
    alpha = tl.exp(m_i - m_safe)
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _lse_finish(m_i, l_i):
    """log(sum(exp(s))) from the running max and sum; -inf for rows with no visible key."""
    return tl.where(l_i > 0, m_i + tl.log(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))


@triton.jit
def _attend_block(q, k_base, v_base, n0, stride_kn, stride_vn, Lk, D, allowed, m_i, l_i, acc, scale,
                  UPCAST: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):  # fmt: skip
    """Fold keys [n0, n0 + BLOCK_N) into the running (m_i, l_i, acc); ``allowed`` is [M, N]."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_mask = (offs_n < Lk)[:, None] & (offs_d < D)[None, :]
    kt = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None], mask=tl.trans(kv_mask), other=0.0)
    s = tl.where(allowed & (offs_n < Lk)[None, :], _dot(q, kt, UPCAST) * scale, float("-inf"))
    p, alpha, m_i, l_i = _online_softmax_step(s, m_i, l_i)
    v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, UPCAST)
    return m_i, l_i, acc


@triton.jit
def _store_rows(o_base, stride_om, offs_m, n_rows, D, acc, l_i, BLOCK_D: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_D)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # rows that saw nothing stay 0
    mask = (offs_m < n_rows)[:, None] & (offs_d < D)[None, :]
    tl.store(
        o_base + offs_m[:, None] * stride_om + offs_d[None, :], out.to(o_base.dtype.element_ty), mask=mask
    )
