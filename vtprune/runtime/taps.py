"""Sub-layer taps: hand a stage's :class:`~vtprune.stages.SublayerTap` each decoder sub-layer's
input and output during prefill, on the tap's layers only.

Forward hooks on ``self_attn`` and ``mlp`` see exactly what the decoder layer computes: the
normed hidden states going in and the sub-layer's output before the residual add. The tap
reduces them at once (e.g. to one number per token), so no layer's hidden states are kept.
"""

from __future__ import annotations

from .state import ACTIVE


def plan_taps(prefill_stages: dict) -> list:
    """The distinct taps named by a plan's prefill stages (``{layer: [stage, ...]}``)."""
    taps: dict = {}
    for group in prefill_stages.values():
        for stage in group:
            if stage.tap is not None:
                taps.setdefault(stage.tap.key, stage.tap)
    return list(taps.values())


def install_taps(taps: list, layers, is_mine, handles: list) -> None:
    """Register the hooks of ``taps`` on ``layers`` (a decoder's ``nn.ModuleList``), recording
    each handle in ``handles`` for exact removal."""
    for tap in taps:
        for i in tap.layers:
            layer = layers[i]
            handles.append(
                layer.self_attn.register_forward_hook(_hook(tap, i, "attn", is_mine), with_kwargs=True)
            )
            handles.append(layer.mlp.register_forward_hook(_hook(tap, i, "mlp", is_mine), with_kwargs=True))


def _hook(tap, i: int, kind: str, is_mine):
    def hook(module, args, kwargs, output):
        state = ACTIVE.get()
        if not is_mine(state) or not state.prefilling:
            return None
        x_in = args[0] if args else kwargs["hidden_states"]
        x_out = output[0] if isinstance(output, tuple) else output
        token_set = state.sets[state.layer_set[i]].to(x_out.device)
        memory = state.step.memo.setdefault(("tap", tap.key), {})
        with state.timed():
            tap.observe(memory, i, kind, x_in, x_out, token_set, state.orig_len)
        return None

    return hook
