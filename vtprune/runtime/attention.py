"""A wrapper attention backend, so skip stages can change how chosen layers attend.

``vtprune_<inner>`` is registered with transformers' ``AttentionInterface`` (and the mask
interface, reusing ``<inner>``'s mask builder) for ``inner`` in sdpa / eager / flash. A plan
with attention skip stages sets only *this model's* text config to the wrapper name; the
wrapper calls the stage's handler for its layers during prefill and the original backend
everywhere else, so the model never leaves SDPA/FlashAttention for the rest of its work.
Decode stages that score every cached position (PrefixKV) tap the same point: they see each
layer's post-rotary q/k exactly as the backend does, then the backend runs unchanged.
"""

from __future__ import annotations

import sys

from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .state import ACTIVE

PREFIX = "vtprune_"


def _inner_function(module, inner: str):
    if inner == "eager":
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[inner]


def _make_backend(inner: str):
    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        state = ACTIVE.get()
        runtime = getattr(state, "runtime", None)
        stage = runtime.attention_handlers.get(module.layer_idx) if runtime is not None else None
        taps = runtime.score_taps.get(module.layer_idx) if runtime is not None else None
        if taps and state.owner == runtime.owner and state.prefilling:
            valid = state.sets[state.layer_set[module.layer_idx]].valid.to(query.device)
            for tap in taps:
                scale = scaling if scaling is not None else query.shape[-1] ** -0.5
                tap.observe(module.layer_idx, query, key, valid, scale, state)
        if stage is not None and state.owner == runtime.owner and (state.prefilling or stage.decode):
            return stage.attention(module, query, key, value, attention_mask, scaling, state), None
        return _inner_function(module, inner)(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )

    return attention


def wrapper_name(inner: str) -> str:
    """Register (once) and return the wrapper backend's name for ``inner``."""
    name = PREFIX + inner
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, _make_backend(inner))
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[inner])
    return name
