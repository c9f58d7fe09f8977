"""Small pure helpers of the runtime: call binding, keep masks, slot look-ups, refusals."""

from __future__ import annotations

import inspect

import torch

from .tokens import TokenSet


def bind_call(signature: inspect.Signature, args, kwargs) -> dict:
    """Named arguments of a call (``**kwargs`` flattened) so hooks can read and rewrite them."""
    call = dict(signature.bind(*args, **kwargs).arguments)
    for name, p in signature.parameters.items():
        if p.kind is inspect.Parameter.VAR_KEYWORD and name in call:
            call.update(call.pop(name))
    return call


def keep_mask(token_set: TokenSet, keep_visual: torch.Tensor) -> torch.Tensor | None:
    """Slots that survive a stage, or ``None`` when the stage drops nothing.

    When visual tokens go, the caller's padding goes too: it is never attended, and keeping
    it would hold every row of a ragged batch at the longest padded length.
    """
    if bool((keep_visual == token_set.visual).all()):
        return None
    return token_set.present & ((token_set.valid & ~token_set.visual) | keep_visual)


def slots_within(outer: TokenSet, inner: TokenSet) -> torch.Tensor:
    """For each slot of ``inner`` (a subset of ``outer``), its slot in ``outer``; -1 at padding."""
    b = outer.orig_index.shape[0]
    n = int(max(outer.orig_index.max(), inner.orig_index.max())) + 2
    table = torch.full((b, n), -1, dtype=torch.long, device=outer.orig_index.device)
    src = torch.where(outer.present, outer.orig_index, n - 1)
    table.scatter_(1, src, torch.arange(outer.length, device=src.device).expand(b, -1))
    table[:, n - 1] = -1
    idx = table.gather(1, inner.orig_index.clamp(min=0).to(table.device))
    return torch.where(inner.present.to(idx.device), idx, -1)


def on_slots(table: torch.Tensor | None, token_set: TokenSet) -> torch.Tensor | None:
    """A per-original-position flag table read at ``token_set``'s slots (padding: False)."""
    if table is None:
        return None
    table = table.to(token_set.orig_index.device)
    return table.gather(1, token_set.orig_index.clamp(min=0)) & token_set.present


def replayed_keep(rows: list[torch.Tensor], token_set: TokenSet, orig_len: int) -> torch.Tensor:
    """Boolean keep mask over ``token_set``'s slots from stored original positions per row."""
    dev = token_set.orig_index.device
    n_orig = max(orig_len, int(token_set.orig_index.max()) + 1)
    table = torch.zeros(len(rows), n_orig + 1, dtype=torch.bool, device=dev)
    for b, kept in enumerate(rows):
        table[b, kept.to(dev)] = True
    return table.gather(1, token_set.orig_index.clamp(min=0)) & token_set.present


def refuse_unsupported(cache) -> None:
    if cache is not None and getattr(cache, "is_compileable", False):
        raise NotImplementedError(
            f"vtprune: {type(cache).__name__} is not supported (pruned layers hold different cache "
            "lengths, which static caches cannot); use the default DynamicCache"
        )
    refuse_compiled()


def refuse_compiled() -> None:
    """Refuse to run a pruning hook under ``torch.compile`` (the hooks keep per-request Python
    state and change sequence lengths between layers, which a compiled graph cannot express)."""
    if under_torch_compile():
        raise NotImplementedError(
            "vtprune: torch.compile is not supported on a pruned model (forward, generate or "
            "training step); run it uncompiled, or call vtprune.remove(model) before compiling"
        )


try:  # looked up once: the check runs in every decoder layer's hook at every step
    from torch._C._dynamo.eval_frame import get_eval_frame_callback as _eval_frame_callback
except ImportError:  # a torch without Dynamo (or with a renamed private API)
    _eval_frame_callback = None


def under_torch_compile() -> bool:
    """Whether the calling code runs inside ``torch.compile``, traced or not.

    ``torch.compiler.is_compiling()`` alone is not enough: it is True only while Dynamo traces.
    A hook that raises there is treated by Dynamo as a graph break, and the frame is re-run
    eagerly, where ``is_compiling()`` is False, so the refusal never reached the caller. In
    that eager re-run Dynamo's frame callback is still installed, which is what we look at.
    """
    if torch.compiler.is_compiling():
        return True
    return _eval_frame_callback is not None and _eval_frame_callback() is not None
