"""Masked attention patterns for skipping visual computation inside decoder layers.

Layout as Hugging Face attention backends see it: q [B, H, Lq, D], k/v [B, H_kv, Lk, D],
H % H_kv == 0 (GQA, K/V never repeated in memory); the queries are the last Lq of the Lk
positions (Lq == Lk at prefill). Each batch row b has a visual span
[visual_start[b], visual_start[b] + visual_len). Every pattern is causal and drops padding keys
(``key_valid`` False); softmax in fp32; a query with no visible key outputs 0; output [B, H,
Lq, D] in q's dtype. ``_visual_mask_ref`` is the executable definition of both masks.
Both ops are differentiable in q, k and v: the backward recomputes the dense PyTorch reference
(memory O(Lq * Lk)), whatever backend ran the forward.

- ``visual_window_attention`` (local visual attention): a visual query at grid cell (r, c)
  (span laid out row-major on grid_h x grid_w) sees the text prefix [0, text_prefix_len) and
  the visual keys at cells (r', c') with |r - r'| <= window // 2 and |c - c'| <= window // 2.
  Text queries (before or after the span) see every earlier key.
- ``head_masked_attention`` (inactive visual heads): in heads with head_mask False no query
  sees the visual keys; they are dropped from the softmax, which renormalises over the rest.
  Heads with head_mask True attend normally.
"""

import torch
import torch.nn.functional as F

from ._autograd import register_reference_backward, upcast
from ._flash import _attend_block, _store_rows
from ._triton import dot_upcast, flash_blocks, last_dim_contiguous, next_pow2, tl, triton
from .dispatch import resolve_backend

__all__ = [
    "visual_window_attention",
    "visual_window_attention_ref",
    "head_masked_attention",
    "head_masked_attention_ref",
]

_WINDOW, _HEADS = 1, 2  # MODE of _visual_attention_kernel
_BLOCKS: tuple[int, int] | None = None  # (BLOCK_M, BLOCK_N) override; tests use small blocks


@triton.jit
def _window_allowed(qpos, offs_n, vs, ve, prefix, grid_w, radius):
    """[M, N]: text queries see all; visual ones the prefix and grid cells within radius."""
    q_vis = (qpos >= vs) & (qpos < ve)
    k_vis = (offs_n >= vs) & (offs_n < ve)
    # Grid coordinates in int32 (cheaper [M, N] arithmetic), clamped to >= 0 before // and %.
    rq = tl.where(q_vis, qpos - vs, 0).to(tl.int32)
    rk = tl.where(k_vis, offs_n - vs, 0).to(tl.int32)
    d_row = (rq // grid_w)[:, None] - (rk // grid_w)[None, :]
    d_col = (rq % grid_w)[:, None] - (rk % grid_w)[None, :]
    near = (tl.abs(d_row) <= radius) & (tl.abs(d_col) <= radius)
    sees = (offs_n < prefix)[None, :] | (k_vis[None, :] & near)
    return (q_vis == 0)[:, None] | sees


@triton.jit
def _head_allowed(offs_n, vs, ve, active):
    """[1, N]: an inactive head (active == 0) sees no visual key."""
    return (((offs_n >= vs) & (offs_n < ve)) == 0)[None, :] | (active != 0)


@triton.jit
def _visual_attention_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, valid_ptr, vstart_ptr, prefix_ptr, head_ptr,
    H, G, Lq, Lk, D, vis_len, grid_h, grid_w, radius, scale,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om, stride_valid,
    MODE: tl.constexpr, HAS_VALID: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Masked causal attention on [B, H, L, D]; queries are the last Lq of Lk positions.

    Keys are visited in two runs, [0, end1) and [start2, end2), chosen per query tile so that
    blocks the mask rules out entirely are never loaded. Grid: (B*H, cdiv(Lq, BLOCK_M)).
    """
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H
    h = bh % H
    m0 = tl.program_id(1).to(tl.int64) * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    qpos = (Lk - Lq) + offs_m
    q = tl.load(
        q_ptr + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
        mask=(offs_m < Lq)[:, None] & (offs_d < D)[None, :],
        other=0.0,
    )
    vs = tl.load(vstart_ptr + b)
    ve = vs + vis_len
    first = (Lk - Lq) + m0
    last = (Lk - Lq) + tl.minimum(m0 + BLOCK_M, Lq) - 1
    hi = tl.minimum(last + 1, Lk)  # causal bound of the whole tile
    prefix = tl.load(prefix_ptr + b) if MODE == 1 else 0
    active = tl.load(head_ptr + h) if MODE == 2 else 1
    if MODE == 1:  # an all-visual tile needs the prefix plus the grid rows within the window
        all_vis = (first >= vs) & (last < ve)
        row_lo = tl.maximum(tl.where(all_vis, first - vs, 0) // grid_w - radius, 0)
        row_hi = tl.minimum(tl.where(all_vis, last - vs, 0) // grid_w + radius + 1, grid_h)
        end1 = tl.where(all_vis, tl.minimum(prefix, hi), hi)
        lo2 = vs + row_lo * grid_w
        end2 = tl.where(all_vis, tl.minimum(vs + row_hi * grid_w, hi), 0)
    else:  # an inactive head skips the visual span
        end1 = tl.where(active != 0, hi, tl.minimum(vs, hi))
        lo2 = ve
        end2 = tl.where(active != 0, 0, hi)
    nb1 = tl.cdiv(end1, BLOCK_N)
    start2 = tl.maximum((lo2 // BLOCK_N) * BLOCK_N, nb1 * BLOCK_N)  # never revisit a block
    nb2 = tl.cdiv(tl.maximum(end2 - start2, 0), BLOCK_N)
    k_base = k_ptr + b * stride_kb + (h // G) * stride_kh
    v_base = v_ptr + b * stride_vb + (h // G) * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for t in range(0, nb1 + nb2):
        n0 = tl.where(t < nb1, t * BLOCK_N, start2 + (t - nb1) * BLOCK_N)
        offs_n = n0 + tl.arange(0, BLOCK_N)
        allowed = offs_n[None, :] <= qpos[:, None]
        if HAS_VALID:
            key_ok = tl.load(valid_ptr + b * stride_valid + offs_n, mask=offs_n < Lk, other=0)
            allowed = allowed & (key_ok != 0)[None, :]
        if MODE == 1:
            allowed = allowed & _window_allowed(qpos, offs_n, vs, ve, prefix, grid_w, radius)
        else:
            allowed = allowed & _head_allowed(offs_n, vs, ve, active)
        m_i, l_i, acc = _attend_block(
            q, k_base, v_base, n0, stride_kn, stride_vn, Lk, D, allowed, m_i, l_i, acc, scale, UPCAST, BLOCK_N, BLOCK_D
        )  # fmt: skip
    _store_rows(o_ptr + b * stride_ob + h * stride_oh, stride_om, offs_m, Lq, D, acc, l_i, BLOCK_D)


def _visual_mask_ref(
    lq, lk, visual_start, visual_len, key_valid, grid_w=1, radius=0, prefix=None, head_mask=None
):
    """Bool [B, 1 or H, Lq, Lk]: the window mask (head_mask None) or the head mask."""
    dev = visual_start.device
    qpos = torch.arange(lk - lq, lk, device=dev)[None, :, None]
    kpos = torch.arange(lk, device=dev)[None, None, :]
    vs = visual_start[:, None, None]
    k_vis = (kpos >= vs) & (kpos < vs + visual_len)  # [B, 1, Lk]
    allowed = (kpos <= qpos).expand(visual_start.shape[0], lq, lk)
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, :]
    if head_mask is not None:
        hidden = k_vis[:, None] & ~head_mask[None, :, None, None]  # [B, H, 1, Lk]
        return allowed[:, None] & ~hidden
    q_vis = (qpos >= vs) & (qpos < vs + visual_len)  # [B, Lq, 1]
    rq, rk = (qpos - vs).clamp(min=0), (kpos - vs).clamp(min=0)
    near = ((rq // grid_w - rk // grid_w).abs() <= radius) & ((rq % grid_w - rk % grid_w).abs() <= radius)
    sees = (kpos < prefix[:, None, None]) | (k_vis & near)
    return (allowed & (~q_vis | sees))[:, None]


def _masked_sdpa_ref(q, k, v, allowed, scaling):
    heads = q.shape[1]
    kf = upcast(k).repeat_interleave(heads // k.shape[1], dim=1)
    vf = upcast(v).repeat_interleave(heads // v.shape[1], dim=1)
    any_key = allowed.any(-1, keepdim=True)  # fully masked rows: unmask for SDPA, then zero
    out = F.scaled_dot_product_attention(upcast(q), kf, vf, attn_mask=allowed | ~any_key, scale=scaling)
    return (out * any_key).to(q.dtype)


def visual_window_attention_ref(
    q, k, v, visual_start, grid_h, grid_w, window, scaling, text_prefix_len=None, key_valid=None
):
    """PyTorch reference of :func:`visual_window_attention`: dense mask + SDPA in fp32."""
    vstart, prefix = _per_row(visual_start, q), _per_row(text_prefix_len, q, visual_start)
    allowed = _visual_mask_ref(
        q.shape[2],
        k.shape[2],
        vstart,
        grid_h * grid_w,
        key_valid,
        grid_w,
        window // 2,
        torch.minimum(prefix, vstart),
    )
    return _masked_sdpa_ref(q, k, v, allowed, scaling)


def head_masked_attention_ref(q, k, v, visual_start, visual_len, head_mask, scaling, key_valid=None):
    """PyTorch reference of :func:`head_masked_attention`: dense mask + SDPA in fp32."""
    allowed = _visual_mask_ref(
        q.shape[2], k.shape[2], _per_row(visual_start, q), visual_len, key_valid, head_mask=head_mask
    )
    return _masked_sdpa_ref(q, k, v, allowed, scaling)


def _per_row(value, q, default=None) -> torch.Tensor:
    """An int or int64 [B] tensor (or None -> default) as an int64 [B] tensor on q's device."""
    value = default if value is None else value
    if isinstance(value, torch.Tensor):
        return value.to(device=q.device, dtype=torch.int64).expand(q.shape[0]).contiguous()
    return torch.full((q.shape[0],), int(value), dtype=torch.int64, device=q.device)


def _visual_triton(
    mode, q, k, v, vstart, vis_len, grid_h, grid_w, radius, prefix, head_mask, key_valid, scaling
):
    q, k, v = last_dim_contiguous(q), last_dim_contiguous(k), last_dim_contiguous(v)
    out = torch.empty_like(q)
    b, heads, lq, dim = q.shape
    if out.numel() == 0:
        return out
    valid = key_valid.contiguous().view(torch.uint8) if key_valid is not None else vstart
    prefix = prefix if prefix is not None else vstart
    head_mask = head_mask.contiguous().view(torch.uint8) if head_mask is not None else vstart
    block_m, block_n, warps = flash_blocks(dim, q.dtype, _BLOCKS)
    grid = (b * heads, triton.cdiv(lq, block_m))
    _visual_attention_kernel[grid](
        q, k, v, out, valid, vstart, prefix, head_mask,
        heads, heads // k.shape[1], lq, k.shape[2], dim, vis_len, grid_h, grid_w, radius, scaling,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], valid.stride(0),
        MODE=mode, HAS_VALID=key_valid is not None, UPCAST=dot_upcast(q.dtype),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=next_pow2(dim, 16), num_warps=warps,
    )  # fmt: skip
    return out


@torch.library.custom_op("vtprune::visual_window_attention", mutates_args=())
def _window_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visual_start: torch.Tensor, grid_h: int, grid_w: int,
    window: int, scaling: float, text_prefix_len: torch.Tensor, key_valid: torch.Tensor | None, backend: str,
) -> torch.Tensor:  # fmt: skip
    if backend != "triton":
        return visual_window_attention_ref(
            q, k, v, visual_start, grid_h, grid_w, window, scaling, text_prefix_len, key_valid
        )
    prefix = torch.minimum(text_prefix_len, visual_start)
    args = (visual_start, grid_h * grid_w, grid_h, grid_w, window // 2, prefix, None, key_valid, scaling)
    return _visual_triton(_WINDOW, q, k, v, *args)


@_window_op.register_fake
def _(q, k, v, visual_start, grid_h, grid_w, window, scaling, text_prefix_len, key_valid, backend):
    return torch.empty_like(q)


register_reference_backward(_window_op, lambda *args: visual_window_attention_ref(*args[:-1]))


@torch.library.custom_op("vtprune::head_masked_attention", mutates_args=())
def _heads_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visual_start: torch.Tensor, visual_len: int,
    head_mask: torch.Tensor, scaling: float, key_valid: torch.Tensor | None, backend: str,
) -> torch.Tensor:  # fmt: skip
    if backend != "triton":
        return head_masked_attention_ref(q, k, v, visual_start, visual_len, head_mask, scaling, key_valid)
    args = (visual_start, visual_len, 1, 1, 0, None, head_mask, key_valid, scaling)
    return _visual_triton(_HEADS, q, k, v, *args)


@_heads_op.register_fake
def _(q, k, v, visual_start, visual_len, head_mask, scaling, key_valid, backend):
    return torch.empty_like(q)


register_reference_backward(_heads_op, lambda *args: head_masked_attention_ref(*args[:-1]))


def _check_qkv(q, k, v, key_valid) -> None:
    if (
        q.dim() != 4
        or k.shape != v.shape
        or k.dim() != 4
        or q.shape[0] != k.shape[0]
        or q.shape[3] != k.shape[3]
    ):
        raise ValueError(
            f"need q [B, H, Lq, D], k and v [B, H_kv, Lk, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape[1] % k.shape[1] or q.shape[2] > k.shape[2]:
        raise ValueError(f"need H % H_kv == 0 and Lq <= Lk; got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if key_valid is not None and (
        key_valid.dtype != torch.bool or key_valid.shape != (k.shape[0], k.shape[2])
    ):
        raise ValueError(f"key_valid must be bool [B, Lk], got {key_valid.dtype} {tuple(key_valid.shape)}")


def visual_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    visual_start: int | torch.Tensor,
    grid_h: int,
    grid_w: int,
    window: int,
    scaling: float,
    text_prefix_len: int | torch.Tensor | None = None,
    key_valid: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Causal attention where visual queries only see the text prefix and nearby visual keys.

    Args:
        q: [B, H, Lq, D]; k, v: [B, H_kv, Lk, D]; queries are the last Lq positions.
        visual_start: first position of the visual span, an int or int64 [B] (per row, e.g.
            with left padding). The span holds grid_h * grid_w tokens, row-major.
        grid_h, grid_w: the visual grid.
        window: odd side of the square neighbourhood (window // 2 cells each way).
        scaling: the attention scale.
        text_prefix_len: visual queries see keys [0, text_prefix_len) before the span
            (int or int64 [B], clamped to visual_start); None means the whole prefix.
        key_valid: optional bool [B, Lk], False for padding keys.
        backend: None/"auto", "triton" or "reference".

    Returns:
        [B, H, Lq, D] in q's dtype. Text queries (before or after the span) are plain causal.

    Example:
        >>> q = k = v = torch.randn(1, 2, 2 + 9 + 3, 16)  # 2 text, a 3x3 image, 3 text
        >>> visual_window_attention(q, k, v, 2, 3, 3, window=3, scaling=0.25).shape
        torch.Size([1, 2, 14, 16])
    """
    _check_qkv(q, k, v, key_valid)
    if window < 1 or window % 2 == 0 or grid_h < 1 or grid_w < 1:
        raise ValueError(
            f"need an odd window >= 1 and a grid >= 1x1, got window={window}, grid={grid_h}x{grid_w}"
        )
    if isinstance(visual_start, int) and not 0 <= visual_start <= k.shape[2] - grid_h * grid_w:
        raise ValueError(
            f"visual span [{visual_start}, {visual_start + grid_h * grid_w}) exceeds Lk={k.shape[2]}"
        )
    vstart, prefix = _per_row(visual_start, q), _per_row(text_prefix_len, q, visual_start)
    backend = resolve_backend(q, k, v, key_valid, backend=backend)
    return _window_op(
        q, k, v, vstart, int(grid_h), int(grid_w), int(window), float(scaling), prefix, key_valid, backend
    )


def head_masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    visual_start: int | torch.Tensor,
    visual_len: int,
    head_mask: torch.Tensor,
    scaling: float,
    key_valid: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Causal attention in which the heads with head_mask False ignore the visual keys.

    Args:
        q: [B, H, Lq, D]; k, v: [B, H_kv, Lk, D]; queries are the last Lq positions.
        visual_start: first visual position, an int or int64 [B].
        visual_len: number of visual tokens (the span is [visual_start, visual_start + visual_len)).
        head_mask: bool [H] over query heads; False drops the visual keys from that head's
            softmax for every query (a visual query there sees only earlier text; with nothing
            before the span it outputs 0). True heads attend as usual.
        scaling: the attention scale.
        key_valid: optional bool [B, Lk], False for padding keys.
        backend: None/"auto", "triton" or "reference".

    Returns:
        [B, H, Lq, D] in q's dtype.

    Example:
        >>> q = k = v = torch.randn(1, 2, 8, 16)
        >>> out = head_masked_attention(q, k, v, 2, 4, torch.tensor([True, False]), 0.25)
        >>> out.shape
        torch.Size([1, 2, 8, 16])
    """
    _check_qkv(q, k, v, key_valid)
    if head_mask.dtype != torch.bool or head_mask.shape != (q.shape[1],):
        raise ValueError(
            f"head_mask must be bool [H={q.shape[1]}], got {head_mask.dtype} {tuple(head_mask.shape)}"
        )
    if visual_len < 0:
        raise ValueError(f"visual_len must be >= 0, got {visual_len}")
    backend = resolve_backend(q, k, v, head_mask, key_valid, backend=backend)
    return _heads_op(
        q, k, v, _per_row(visual_start, q), int(visual_len), head_mask, float(scaling), key_valid, backend
    )
