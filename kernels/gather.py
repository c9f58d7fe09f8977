"""Row gather along the sequence axis (token compaction), optionally fused with RMSNorm.

Semantics (``gather_rows_ref``), for ``index`` of shape [B, N] (int64):

    out[b, n, :]    = x[b, index[b, n], :]      for x of shape [B, L, D]
    out[b, h, n, :] = x[b, h, index[b, n], :]   for x of shape [B, H, L, D]  (KV cache)

A negative index (use -1) marks a padding slot and produces a row of zeros, so rows of a batch
that keep different token counts share one rectangular output. A tensor with batch size 1
(broadcast cos/sin) is expanded to B. Values >= L are an error: the reference raises, the
Triton kernel writes zeros instead of reading out of bounds.

Both ops are differentiable (backward in PyTorch, whatever the forward backend): the gather's
adjoint sums gradients back onto the source rows (scatter-add; padding slots get none), and the
fused op adds the RMSNorm backward on the gathered rows before that scatter.
"""

import torch

from ._autograd import scatter_rows, upcast
from ._triton import last_dim_contiguous, next_pow2, tl, triton
from .dispatch import resolve_backend

__all__ = ["gather_rows", "gather_rows_ref", "gather_rows_rmsnorm", "gather_rows_rmsnorm_ref"]

_MAX_SLOTS = 4  # tensors copied by one launch (hidden, cos, sin, ... or K and V)
_TILE = 2048  # elements per program per step: big enough to saturate HBM, small for registers


@triton.jit
def _copy_tile(src, dst, src_off, dst_off, mask, valid):
    x = tl.load(src + src_off, mask=mask & valid, other=0)
    tl.store(dst + dst_off, x, mask=mask)


@triton.jit
def _gather_rows_kernel(
    index_ptr, src0, dst0, src1, dst1, src2, dst2, src3, dst3, N, L, H, D,
    stride_ib, stride_in, stride_sb, stride_sh, stride_sl,
    NUM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """dst_s[b, h, n, :] = src_s[b, h, index[b, n], :] (0 where index < 0) for NUM slots s.

    All slots share H, D and source strides; their dtypes may differ. Grid: (B*N, cdiv(H, BLOCK_H)).
    """
    row = tl.program_id(0).to(tl.int64)
    h0 = tl.program_id(1).to(tl.int64) * BLOCK_H
    b = row // N
    n = row % N
    src_row = tl.load(index_ptr + b * stride_ib + n * stride_in)
    valid = (src_row >= 0) & (src_row < L)
    src_row = tl.where(valid, src_row, 0)
    offs_h = h0 + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    src_base = b * stride_sb + src_row * stride_sl + offs_h[:, None] * stride_sh
    dst_base = ((b * H + offs_h[:, None]) * N + n) * D  # destinations are contiguous [B, H, N, D]
    for d0 in range(0, D, BLOCK_D):
        d = d0 + offs_d[None, :]
        mask = (offs_h[:, None] < H) & (d < D)
        _copy_tile(src0, dst0, src_base + d, dst_base + d, mask, valid)
        if NUM > 1:
            _copy_tile(src1, dst1, src_base + d, dst_base + d, mask, valid)
        if NUM > 2:
            _copy_tile(src2, dst2, src_base + d, dst_base + d, mask, valid)
        if NUM > 3:
            _copy_tile(src3, dst3, src_base + d, dst_base + d, mask, valid)


@triton.jit
def _gather_rows_rmsnorm_kernel(
    index_ptr, x_ptr, w_ptr, g_ptr, y_ptr, N, L, D, eps,
    stride_ib, stride_in, stride_xb, stride_xl, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """g[b, n] = x[b, index[b, n]] (0 if index < 0); y[b, n] = w * (g * rsqrt(mean(g^2) + eps)).

    As Llama's RMSNorm: statistics in fp32, the normalised row cast back to x's dtype before the
    weight multiply. One program per output row; the whole row fits one block.
    """
    row = tl.program_id(0).to(tl.int64)
    b = row // N
    n = row % N
    src_row = tl.load(index_ptr + b * stride_ib + n * stride_in)
    valid = (src_row >= 0) & (src_row < L)
    src_row = tl.where(valid, src_row, 0)
    offs = tl.arange(0, BLOCK_D)
    mask = offs < D
    x = tl.load(x_ptr + b * stride_xb + src_row * stride_xl + offs, mask=mask & valid, other=0)
    tl.store(g_ptr + row * D + offs, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / D + eps)
    xn = (xf * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0).to(tl.float32)
    tl.store(y_ptr + row * D + offs, (w * xn).to(y_ptr.dtype.element_ty), mask=mask)


def _as_4d(t: torch.Tensor, batch: int) -> torch.Tensor:
    if t.dim() not in (3, 4):
        raise ValueError(
            f"gather_rows expects tensors shaped [B, L, D] or [B, H, L, D], got {tuple(t.shape)}"
        )
    if t.shape[0] not in (1, batch):
        raise ValueError(f"tensor batch {t.shape[0]} matches neither the index batch {batch} nor 1")
    t = t.expand(batch, *t.shape[1:])
    return t.unsqueeze(1) if t.dim() == 3 else t


def _out_shape(t: torch.Tensor, index: torch.Tensor) -> tuple[int, ...]:
    batch, n = index.shape
    return (batch, n, t.shape[-1]) if t.dim() == 3 else (batch, t.shape[1], n, t.shape[-1])


def gather_rows_ref(tensors: list[torch.Tensor], index: torch.Tensor) -> list[torch.Tensor]:
    """PyTorch reference of :func:`gather_rows` (same arguments, always a list)."""
    outs = []
    pad = index < 0
    for t in tensors:
        x = _as_4d(t, index.shape[0])
        idx = index.clamp(min=0)[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[-1])
        g = torch.gather(x, 2, idx).masked_fill(pad[:, None, :, None], 0)
        outs.append(g.reshape(_out_shape(t, index)))
    return outs


def _gather_rows_triton(tensors: list[torch.Tensor], index: torch.Tensor) -> list[torch.Tensor]:
    batch, n = index.shape
    outs = [torch.empty(_out_shape(t, index), dtype=t.dtype, device=t.device) for t in tensors]
    srcs = [last_dim_contiguous(_as_4d(t, batch)) for t in tensors]
    # Tensors with the same head count, width, length and source strides share one launch.
    groups: dict[tuple, list[int]] = {}
    for i, s in enumerate(srcs):
        groups.setdefault((s.shape[1:], s.stride()[:3]), []).append(i)
    for members in groups.values():
        for start in range(0, len(members), _MAX_SLOTS):
            chunk = members[start : start + _MAX_SLOTS]
            _launch_gather([srcs[i] for i in chunk], [outs[i] for i in chunk], index)
    return outs


def _launch_gather(srcs: list[torch.Tensor], dsts: list[torch.Tensor], index: torch.Tensor) -> None:
    batch, n = index.shape
    _, heads, length, width = srcs[0].shape
    if batch * n == 0 or heads * width == 0:
        return
    block_d = min(next_pow2(width), _TILE)
    block_h = min(next_pow2(heads), max(1, _TILE // block_d))
    pairs = [(s, d) for s, d in zip(srcs, dsts)]
    pairs += [pairs[0]] * (_MAX_SLOTS - len(pairs))  # unused slots: never touched (NUM constexpr)
    ptrs = [p for pair in pairs for p in pair]
    grid = (batch * n, triton.cdiv(heads, block_h))
    _gather_rows_kernel[grid](
        index, *ptrs, n, length, heads, width, index.stride(0), index.stride(1), *srcs[0].stride()[:3],
        NUM=len(srcs), BLOCK_H=block_h, BLOCK_D=block_d, num_warps=4,
    )  # fmt: skip


@torch.library.custom_op("vtprune::gather_rows", mutates_args=())
def _gather_rows_op(tensors: list[torch.Tensor], index: torch.Tensor, backend: str) -> list[torch.Tensor]:
    if backend == "triton":
        return _gather_rows_triton(tensors, index)
    return gather_rows_ref(tensors, index)


@_gather_rows_op.register_fake
def _(tensors, index, backend):
    return [t.new_empty(_out_shape(t, index)) for t in tensors]


def _gather_rows_setup(ctx, inputs, output):
    tensors, index, _ = inputs
    ctx.save_for_backward(index)
    ctx.sources = [(t.shape, t.dtype) for t in tensors]


def _gather_rows_backward(ctx, grads):
    (index,) = ctx.saved_tensors
    out = [
        None if g is None or not needed else scatter_rows(g, index, shape, dtype)
        for g, (shape, dtype), needed in zip(grads, ctx.sources, _needs(ctx, 0, len(grads)))
    ]
    return out, None, None


def _needs(ctx, position: int, count: int) -> list[bool]:
    """Per tensor of a list argument, whether it needs a gradient (a bool for the whole list
    in some torch versions)."""
    flag = ctx.needs_input_grad[position]
    return list(flag) if isinstance(flag, (list, tuple)) else [bool(flag)] * count


_gather_rows_op.register_autograd(_gather_rows_backward, setup_context=_gather_rows_setup)


def _check_index(index: torch.Tensor) -> None:
    if index.dim() != 2 or index.dtype != torch.int64:
        raise ValueError(f"index must be int64 [B, N], got {index.dtype} {tuple(index.shape)}")


def gather_rows(
    tensors: torch.Tensor | list[torch.Tensor] | tuple[torch.Tensor, ...],
    index: torch.Tensor,
    backend: str | None = None,
) -> torch.Tensor | list[torch.Tensor]:
    """Gather rows of every tensor along its sequence axis with one shared per-batch index.

    Args:
        tensors: one tensor or a list/tuple of tensors shaped [B, L, D] (hidden states, cos,
            sin; batch 1 broadcasts) or [B, H, L, D] (a KV cache layer). Widths and dtypes may
            differ; L must be the same for all.
        index: int64 [B, N], source positions in [0, L); -1 marks a padding slot (zero row).
        backend: None/"auto", "triton" or "reference" (see ``vtprune.kernels.dispatch``).

    Returns:
        The gathered tensors ([B, N, D] or [B, H, N, D], input dtypes), as a list, or a single
        tensor when a single tensor was given. Tensors with equal shape and strides (cos and
        sin, K and V) are copied by one kernel launch. Differentiable: the backward sums
        gradients onto the source rows (padding slots send none back).

    Example:
        >>> h, cos = torch.randn(2, 5, 8), torch.randn(1, 5, 4)
        >>> keep = torch.tensor([[0, 2, 4], [1, 3, -1]])
        >>> g, c = gather_rows([h, cos], keep)
        >>> g.shape, c.shape, bool(g[1, 2].eq(0).all())
        (torch.Size([2, 3, 8]), torch.Size([2, 3, 4]), True)
    """
    single = isinstance(tensors, torch.Tensor)
    tensors = [tensors] if single else list(tensors)
    _check_index(index)
    lengths = {t.shape[-2] for t in tensors}
    if len(lengths) > 1:
        raise ValueError(f"all tensors must share the sequence length, got {sorted(lengths)}")
    outs = _gather_rows_op(tensors, index, resolve_backend(index, *tensors, backend=backend))
    return outs[0] if single else list(outs)


def gather_rows_rmsnorm_ref(
    hidden: torch.Tensor, index: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch reference of :func:`gather_rows_rmsnorm`."""
    (gathered,) = gather_rows_ref([hidden], index)
    x = upcast(gathered)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return gathered, weight * x.to(hidden.dtype)


def _gather_rows_rmsnorm_triton(hidden, index, weight, eps):
    batch, n = index.shape
    x = last_dim_contiguous(hidden.expand(batch, *hidden.shape[1:]))
    width = x.shape[-1]
    gathered = torch.empty((batch, n, width), dtype=x.dtype, device=x.device)
    normed = torch.empty_like(gathered, dtype=torch.promote_types(weight.dtype, x.dtype))
    if batch * n == 0:
        return gathered, normed
    block_d = next_pow2(width)
    warps = 4 if block_d <= 2048 else (8 if block_d <= 8192 else 16)
    _gather_rows_rmsnorm_kernel[(batch * n,)](
        index, x, weight.contiguous(), gathered, normed, n, x.shape[1], width, eps,
        index.stride(0), index.stride(1), x.stride(0), x.stride(1), BLOCK_D=block_d, num_warps=warps,
    )  # fmt: skip
    return gathered, normed


@torch.library.custom_op("vtprune::gather_rows_rmsnorm", mutates_args=())
def _gather_rows_rmsnorm_op(
    hidden: torch.Tensor, index: torch.Tensor, weight: torch.Tensor, eps: float, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    if backend == "triton":
        return _gather_rows_rmsnorm_triton(hidden, index, weight, eps)
    return gather_rows_rmsnorm_ref(hidden, index, weight, eps)


@_gather_rows_rmsnorm_op.register_fake
def _(hidden, index, weight, eps, backend):
    shape = (index.shape[0], index.shape[1], hidden.shape[-1])
    return hidden.new_empty(shape), hidden.new_empty(
        shape, dtype=torch.promote_types(weight.dtype, hidden.dtype)
    )


def _rmsnorm_setup(ctx, inputs, output):
    hidden, index, weight, eps, _ = inputs
    ctx.save_for_backward(output[0], index, weight)
    ctx.eps, ctx.hidden_shape = eps, hidden.shape


def _rmsnorm_backward(ctx, grad_gathered, grad_normed):
    """The reference's chain rule: y = w * n, n = (x * r).to(dtype), r = rsqrt(mean(x^2) + eps),
    x = upcast(gathered); gathered feeds both outputs."""
    gathered, index, weight = ctx.saved_tensors
    need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
    x = upcast(gathered)
    r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + ctx.eps)
    grad_hidden = grad_weight = None
    if grad_normed is not None and need_weight:
        n = (x * r).to(gathered.dtype)
        grad_weight = (grad_normed * n).sum((0, 1)).to(weight.dtype)
    if need_hidden:
        grad = torch.zeros_like(gathered) if grad_gathered is None else grad_gathered
        if grad_normed is not None:
            gn = upcast((grad_normed * weight).to(gathered.dtype))
            gx = r * (gn - x * r.pow(2) * (gn * x).mean(-1, keepdim=True))
            grad = grad + gx.to(gathered.dtype)
        grad_hidden = scatter_rows(grad, index, ctx.hidden_shape, gathered.dtype)
    return grad_hidden, None, grad_weight, None, None


_gather_rows_rmsnorm_op.register_autograd(_rmsnorm_backward, setup_context=_rmsnorm_setup)


def gather_rows_rmsnorm(
    hidden: torch.Tensor,
    index: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather hidden-state rows and apply the next layer's RMSNorm in the same pass.

    Args:
        hidden: [B, L, D] (batch 1 broadcasts).
        index: int64 [B, N] as in :func:`gather_rows` (-1 = zero padding row).
        weight: [D], the RMSNorm weight.
        eps: the RMSNorm epsilon.
        backend: None/"auto", "triton" or "reference".

    Returns:
        ``(gathered, normed)``: gathered [B, N, D] in hidden's dtype (the residual stream) and
        ``weight * (x * rsqrt(mean(x^2) + eps)).to(hidden.dtype)`` with statistics in fp32
        (Llama's RMSNorm; the reference keeps fp64 input in fp64), in
        ``promote_types(weight.dtype, hidden.dtype)``. Padding rows are 0. Differentiable in
        ``hidden`` and ``weight``.

    Example:
        >>> h, w = torch.randn(1, 6, 8), torch.ones(8)
        >>> g, y = gather_rows_rmsnorm(h, torch.tensor([[5, 0]]), w, 1e-6)
        >>> torch.allclose(g[0, 0], h[0, 5]), y.shape
        (True, torch.Size([1, 2, 8]))
    """
    _check_index(index)
    if hidden.dim() != 3 or weight.shape != hidden.shape[-1:]:
        raise ValueError(
            f"need hidden [B, L, D] and weight [D], got {tuple(hidden.shape)}, {tuple(weight.shape)}"
        )
    if hidden.shape[0] not in (1, index.shape[0]):
        raise ValueError(
            f"hidden batch {hidden.shape[0]} matches neither the index batch {index.shape[0]} nor 1"
        )
    backend = resolve_backend(hidden, index, weight, backend=backend)
    return _gather_rows_rmsnorm_op(hidden, index, weight, float(eps), backend)
