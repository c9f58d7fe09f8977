"""Everything that differs between the transformers releases vtprune supports, in one place.

The runtime hooks read and rewrite the arguments of Hugging Face forwards, so they depend on
argument names that move between minors. This module owns every such difference; the runtime
asks it (``get_cache``, ``set_cache``, ``causal_mask``, ``output_cache``) and never tests a
version itself.

Differences within the tested range (5.19 - 5.24):

* 5.24 renamed the KV-cache argument of every model, decoder layer, ``create_causal_mask`` and
  ``prepare_inputs_for_generation`` from ``past_key_values`` to ``cache`` (the old name is
  accepted with a deprecation warning until 5.40), and the output field to ``outputs.cache``.
  The hooks see the arguments *before* transformers' renaming decorator does, so both names can
  arrive; a hook that adds a cache must use the name the forward declares, or the model gets
  "both `past_key_values` and `cache` are set" and ignores ours.
* Qwen2-VL needs ``mm_token_type_ids`` for its 3-D M-RoPE positions on every release of the
  range (without it the model falls back to 1-D positions with a warning); nothing differs.

:func:`check_wiring` is the signature sentinel: it checks, at ``apply`` and in the tests, every
forward parameter and output field the hooks rely on, so a moved parameter becomes one clear
error naming it instead of a shape error deep in a kernel.

Example:
    >>> get_cache({"cache": None, "past_key_values": "old"})
    'old'
    >>> kw = {"past_key_values": None}
    >>> set_cache(kw, "c", "cache"); kw
    {'cache': 'c'}
"""

from __future__ import annotations

import dataclasses
import inspect
import warnings

import transformers

# The oldest and the newest minor CI tests (pyproject allows exactly >=OLDEST,<NEWEST+1).
OLDEST_TESTED = (5, 19)
NEWEST_TESTED = (5, 24)
CACHE_NAMES = ("cache", "past_key_values")  # new name first

_warned_untested: set[str] = set()


def version_tuple(v: str | None = None) -> tuple[int, int]:
    """``(major, minor)`` of a version string (default: the installed transformers).

    Example:
        >>> version_tuple("5.24.0.dev0")
        (5, 24)
    """
    parts = []
    for piece in (v or transformers.__version__).split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return (parts + [0])[0], (parts + [0, 0])[1]


def tested_range() -> str:
    return f"{OLDEST_TESTED[0]}.{OLDEST_TESTED[1]} - {NEWEST_TESTED[0]}.{NEWEST_TESTED[1]}"


def pip_spec() -> str:
    return f"transformers>={OLDEST_TESTED[0]}.{OLDEST_TESTED[1]},<{NEWEST_TESTED[0]}.{NEWEST_TESTED[1] + 1}"


def check_transformers() -> None:
    """At import: refuse releases older than the tested range (their decoder loop differs)."""
    if version_tuple() < OLDEST_TESTED:
        raise ImportError(
            f"vtprune needs transformers {tested_range()} (found {transformers.__version__}); "
            f"older releases wire the decoder loop differently. Install a tested one: pip install '{pip_spec()}'"
        )


def warn_if_untested() -> None:
    """At ``apply``: one warning per process when the installed release is newer than tested."""
    v = transformers.__version__
    if version_tuple(v) > NEWEST_TESTED and v not in _warned_untested:
        _warned_untested.add(v)
        warnings.warn(
            f"vtprune is tested with transformers {tested_range()}; {v} is newer. The signature check "
            "found everything the hooks rely on in place, but results are unverified on this release.",
            stacklevel=3,
        )


# -- the cache argument ------------------------------------------------------------------------
def get_cache(kwargs: dict):
    """The KV cache of a call, under whichever name the caller used (``None`` if absent)."""
    for name in CACHE_NAMES:
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def set_cache(kwargs: dict, cache, name: str) -> None:
    """Put ``cache`` under ``name`` (the forward's declared parameter), dropping the other name."""
    for other in CACHE_NAMES:
        if other != name:
            kwargs.pop(other, None)
    kwargs[name] = cache


def output_cache(output):
    """The cache a model returned (``outputs.cache`` from 5.24, ``past_key_values`` before)."""
    for name in CACHE_NAMES:
        value = output.get(name) if hasattr(output, "get") else getattr(output, name, None)
        if value is not None:
            return value
    return None


def cache_kwargs(cache) -> dict:
    """``{name: cache}`` under the name this transformers' forwards declare, for callers that
    continue from a cache by hand (``model(**inputs, **cache_kwargs(cache))``)."""
    from transformers.masking_utils import create_causal_mask

    return {cache_param(create_causal_mask): cache}


def cache_param(fn) -> str | None:
    """Which of the cache names the callable ``fn`` declares (``None`` if neither)."""
    params = inspect.signature(fn).parameters
    return next((n for n in CACHE_NAMES if n in params), None)


def causal_mask(config, inputs_embeds, attention_mask, cache, layer_idx: int):
    """transformers' ``create_causal_mask`` for one layer's cache (cache passed by position:
    the parameter was renamed in 5.24, its place was not)."""
    from transformers.masking_utils import create_causal_mask

    return create_causal_mask(
        config, inputs_embeds, attention_mask, cache, position_ids=None, layer_idx=layer_idx
    )


# -- the signature sentinel ---------------------------------------------------------------------
class WiringError(RuntimeError):
    """Something the hooks rely on moved in the installed transformers."""


@dataclasses.dataclass(frozen=True)
class Wiring:
    """What the sentinel found: the cache argument name each hooked forward takes."""

    cache_arg: str  # multimodal model, language model, decoder layers (one name for all)


# (what, the parameters its forward must declare) checked by ``check_wiring``
_LAYER_PARAMS = ("hidden_states", "attention_mask", "position_embeddings", "position_ids")
_LM_PARAMS = ("inputs_embeds", "attention_mask", "position_ids", "use_cache")
_MM_PARAMS = (
    "input_ids",
    "inputs_embeds",
    "attention_mask",
    "position_ids",
    "pixel_values",
    "mm_encoder_outputs",
)
_MASK_PARAMS = ("config", "inputs_embeds", "attention_mask", "position_ids", "layer_idx")


def _moved(what: str, name: str, detail: str = "") -> WiringError:
    return WiringError(
        f"vtprune: transformers {transformers.__version__} changed something the pruning hooks rely on: "
        f"{what} {detail or f'no longer takes the parameter {name!r}'}. vtprune is tested with transformers "
        f"{tested_range()}; install one of those (pip install '{pip_spec()}') or upgrade vtprune."
    )


def _require(fn, what: str, names, extra=()) -> str:
    """Check ``fn`` declares ``names`` (+ adapter-specific ``extra``) and one cache name."""
    params = inspect.signature(fn).parameters
    for name in (*names, *extra):
        if name not in params:
            raise _moved(what, name)
    found = cache_param(fn)
    if found is None:
        raise _moved(
            what, CACHE_NAMES[0], f"takes neither {CACHE_NAMES[0]!r} nor {CACHE_NAMES[1]!r} (the KV cache)"
        )
    return found


def _forward(module):
    return type(module).forward


def check_wiring(adapter) -> Wiring:
    """Check every forward signature and output field the hooks rely on; return the wiring.

    Raises :class:`WiringError` naming the parameter (and the transformers version) when one
    moved. Run at ``apply`` before any hook is installed.
    """
    layer = adapter.layers[0]
    names = {
        _require(_forward(layer), f"{type(layer).__name__}.forward", _LAYER_PARAMS),
        _require(
            _forward(adapter.language_model), f"{type(adapter.language_model).__name__}.forward", _LM_PARAMS
        ),
        _require(
            _forward(adapter.mm_model),
            f"{type(adapter.mm_model).__name__}.forward",
            _MM_PARAMS,
            adapter.required_call_params(),
        ),
    }
    for name in adapter.encoder_methods():
        # the encoder tap shadows these to read each image's structure while it is encoded
        method = getattr(type(adapter.mm_model), name, None)
        if method is None:
            raise _moved(type(adapter.mm_model).__name__, name, f"has no method {name!r}")
    if adapter.injection_method is not None:
        # the runtime shadows it to hand it the kept tokens' rows (Qwen3-VL's DeepStack)
        lm = type(adapter.language_model)
        method = getattr(lm, adapter.injection_method, None)
        if method is None or len(inspect.signature(method).parameters) != 4:
            raise _moved(
                lm.__name__,
                adapter.injection_method,
                f"has no method {adapter.injection_method}(hidden_states, visual_pos_masks, visual_embeds)",
            )
    if "pixel_values" not in inspect.signature(type(adapter.mm_model).get_image_features).parameters:
        raise _moved(f"{type(adapter.mm_model).__name__}.get_image_features", "pixel_values")
    if adapter.outer is not None:
        outer = type(adapter.outer)
        names.add(_require(outer.forward, f"{outer.__name__}.forward", ("labels",)))
        # generate() hands the cache to forward under the name prepare_inputs_for_generation takes
        names.add(
            _require(
                outer.prepare_inputs_for_generation, f"{outer.__name__}.prepare_inputs_for_generation", ()
            )
        )
    from transformers import masking_utils, modeling_outputs

    names.add(_require(masking_utils.create_causal_mask, "masking_utils.create_causal_mask", _MASK_PARAMS))
    if len(names) != 1:
        raise _moved(
            "the KV-cache argument", "", f"has different names across the hooked forwards ({sorted(names)})"
        )
    cache_arg = names.pop()
    fields = {f.name for f in dataclasses.fields(modeling_outputs.BaseModelOutputWithPast)}
    for name in ("last_hidden_state", cache_arg):
        if name not in fields:
            raise _moved("BaseModelOutputWithPast", name, f"has no output field {name!r}")
    return Wiring(cache_arg=cache_arg)
