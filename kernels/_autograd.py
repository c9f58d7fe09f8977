"""Backward passes of the custom ops, shared by the op modules.

Ops that carry data (the gathers, the attention variants) get a backward; the ops that compute
pruning scores do not (selections are not differentiated) and say so when asked for one.

- ``scatter_rows``: the adjoint of the row gather (gradients summed back onto source rows).
- ``register_reference_backward``: a backward that recomputes the op's PyTorch reference from
  the saved inputs under autograd and returns its vector-Jacobian product. Exact by
  construction (the reference defines the op); costs one dense forward of the reference.
- ``register_no_backward``: a backward that raises a clear error.
"""

from __future__ import annotations

import torch

__all__ = ["upcast", "scatter_rows", "register_reference_backward", "register_no_backward"]


def upcast(x: torch.Tensor) -> torch.Tensor:
    """``x`` in at least fp32 (fp16/bf16 -> fp32; fp64 stays fp64): the references' compute dtype."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def scatter_rows(
    grad: torch.Tensor, index: torch.Tensor, shape: torch.Size, dtype: torch.dtype
) -> torch.Tensor:
    """Adjoint of ``gather_rows`` for one tensor: ``grad`` [B, N, D] or [B, H, N, D] summed back
    onto the source rows of a tensor of ``shape`` ([B or 1, L, D] or [B or 1, H, L, D]).

    Padding slots (index < 0) contribute nothing; a source row gathered twice gets both
    gradients; a batch-1 (broadcast) source gets the sum over the batch.
    """
    g = grad if grad.dim() == 4 else grad.unsqueeze(1)
    b, h, n, d = g.shape
    g = g.masked_fill((index < 0)[:, None, :, None], 0)
    idx = index.clamp(min=0)[:, None, :, None].expand(b, h, n, d)
    out = g.new_zeros(b, h, shape[-2], d).scatter_add_(2, idx, g)
    if len(shape) == 3:
        out = out.squeeze(1)
    if shape[0] != b:
        out = out.sum(0, keepdim=True)
    return out.to(dtype)


def _setup_saving_inputs(ctx, inputs, output) -> None:
    positions = [i for i, a in enumerate(inputs) if isinstance(a, torch.Tensor)]
    ctx.save_for_backward(*(inputs[i] for i in positions))
    ctx.tensor_positions = positions
    ctx.other_inputs = [None if isinstance(a, torch.Tensor) else a for a in inputs]


def register_reference_backward(op, reference) -> None:
    """Give ``op`` (a ``torch.library.custom_op``) the backward of ``reference``.

    ``reference`` takes the op's arguments in the op's order and is differentiable in its
    floating-point tensor arguments.
    """

    def backward(ctx, grad):
        args = list(ctx.other_inputs)
        for i, t in zip(ctx.tensor_positions, ctx.saved_tensors):
            args[i] = t
        wanted = [i for i in ctx.tensor_positions if ctx.needs_input_grad[i] and args[i].is_floating_point()]
        grads: list = [None] * len(args)
        if not wanted:
            return tuple(grads)
        with torch.enable_grad():
            for i in wanted:
                args[i] = args[i].detach().requires_grad_(True)
            out = reference(*args)
            found = torch.autograd.grad(out, [args[i] for i in wanted], grad, allow_unused=True)
        for i, g in zip(wanted, found):
            grads[i] = g if g is not None else torch.zeros_like(args[i])
        return tuple(grads)

    op.register_autograd(backward, setup_context=_setup_saving_inputs)


def register_no_backward(op, name: str, why: str) -> None:
    """Make a backward through ``op`` fail with ``why`` rather than with a missing-formula error."""

    def backward(ctx, grad):
        raise RuntimeError(f"vtprune.{name} is not differentiable: {why}")

    op.register_autograd(backward, setup_context=lambda ctx, inputs, output: None)
