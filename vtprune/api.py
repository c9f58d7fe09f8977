"""The public entry points: ``apply``, ``remove``, ``stats``, ``pruned``."""

from __future__ import annotations

import contextlib
import copy
import weakref

from torch import nn
from transformers import Cache

from vtprune import compat
from vtprune.config import MethodConfig, ModelInfo, VideoBudget, config_from_name
from vtprune.integrations import adapter_for
from vtprune.runtime.engine import Runtime
from vtprune.runtime.state import state_of_cache
from vtprune.stats import PruneStats

_HANDLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class Handle:
    """What ``apply`` returns: the plan in force on one model, and how to undo it.

    Example:
        >>> handle = vtprune.apply(model, "fastv", keep=0.5)  # doctest: +SKIP
        >>> handle.remove()  # doctest: +SKIP
    """

    def __init__(self, model, configs: list[MethodConfig], runtime: Runtime, stages: list):
        self.model = model
        self.configs = configs
        self.runtime = runtime
        self.stages = stages

    def remove(self) -> None:
        """Remove this plan; a no-op when it was already replaced or removed (never the current one)."""
        if _HANDLES.get(self.model) is self:
            remove(self.model)

    @property
    def stats(self) -> PruneStats | None:
        """The last request's stats in the calling thread (see :func:`stats`)."""
        return self.runtime.last_stats

    def __repr__(self) -> str:
        return f"Handle({', '.join(repr(c) for c in self.configs)} on {type(self.model).__name__})"


def _configs(method, options) -> list[MethodConfig]:
    from vtprune.compose import Compose

    if isinstance(method, str):
        return [config_from_name(method, **options)]
    if options:
        raise ValueError(
            "options are given inside the config object; pass either a name + options or a config"
        )
    if isinstance(method, Compose):
        return list(method.configs)
    if isinstance(method, MethodConfig):
        return [method]
    raise TypeError(f"method must be a registered name or a config object, not {type(method).__name__}")


def apply(model, method, *, timing: bool = False, **options) -> Handle:
    """Prune visual tokens of ``model`` (an instance; classes are never patched).

    Args:
        model: a LLaVA-1.5, LLaVA-NeXT or Qwen2-VL model (``*ForConditionalGeneration`` or
            its inner ``*Model``).
        method: a registered name (``"fastv"``, ``"pdrop"``, ``"random"``, ``"uniform"``, ...)
            or a config object (``vtprune.PyramidDrop(keep=0.25)``, ``vtprune.Compose(...)``).
        timing: measure the method's own time into ``stats(model).overhead_s``. Off by
            default: on a GPU it synchronises the stream before and after every stage, which
            stalls the pipeline at every pruning point (the benchmarks turn it on).
        **options: the method's options when ``method`` is a name, e.g. ``keep=0.25``.

    Applying again replaces the previous plan. ``apply`` is all-or-nothing: every option is
    checked against the model before anything is touched, and on any error the model is left
    exactly as it was (with its previous plan, if it had one). ``copy.deepcopy`` of a pruned
    model gives a copy with its own working copy of the plan.

    Example:
        >>> handle = vtprune.apply(model, "pdrop", keep=0.25)  # doctest: +SKIP
        >>> out = model.generate(**inputs)  # doctest: +SKIP
    """
    configs = _configs(method, options)
    for cfg in configs:
        cfg.check()
    adapter = adapter_for(model)
    _refuse_nested(model, adapter)
    wiring = compat.check_wiring(adapter)
    compat.warn_if_untested()
    info = ModelInfo(
        num_layers=adapter.num_layers, family=adapter.family, vision_layers=_tower_depth(adapter)
    )
    stages = [stage for cfg in configs for stage in _stages_of(cfg, info)]
    _check_model(adapter, configs, stages)
    keys = [s.key for s in stages]
    if len(set(keys)) != len(keys):
        raise ValueError(f"two stages act at the same point with the same method: {keys}")
    runtime = Runtime(model, adapter, stages, wiring, timing=bool(timing))  # touches nothing yet
    previous = _HANDLES.get(model)
    if previous is not None:
        previous.runtime.remove()
    try:
        runtime.install()
    except BaseException:
        runtime.remove()  # every hook it managed to install goes, then the old plan comes back
        if previous is not None:
            previous.runtime.install()
        raise
    handle = Handle(model, configs, runtime, stages)
    _HANDLES[model] = handle
    model.__dict__["__deepcopy__"] = _deepcopy_with_plan(handle)
    return handle


def _tower_depth(adapter) -> int | None:
    try:
        return adapter.vision_layers_count
    except NotImplementedError:
        return None


def _refuse_nested(model, adapter) -> None:
    """One plan per model: refuse a plan on the inner model while the outer one has one, or
    the reverse (both would hook the same modules; generate would then misread the cache)."""
    for other, handle in list(_HANDLES.items()):
        if other is not model and handle.runtime.adapter.mm_model is adapter.mm_model:
            where = "inner" if other is adapter.mm_model else "outer"
            raise ValueError(
                f"vtprune: a plan ({', '.join(c.name for c in handle.configs)}) is already applied to the "
                f"{where} {type(other).__name__} of this model; remove it first (vtprune.remove on that "
                "module) or apply to that module instead"
            )


def _deepcopy_with_plan(handle: Handle):
    """``copy.deepcopy(model)`` of a pruned model: copy it clean, then give the copy its own plan.

    Copying the hooks themselves would carry closures bound to the original's runtime (a copy
    that runs unpruned and whose ``remove`` cannot reach its hooks), so the plan is lifted off
    for the copy and applied to it afresh.
    """

    def __deepcopy__(memo):
        model = handle.model
        handle.runtime.remove()
        del model.__dict__["__deepcopy__"]
        try:
            clone = copy.deepcopy(model, memo)
        finally:
            handle.runtime.install()
            model.__dict__["__deepcopy__"] = __deepcopy__
        apply(clone, _restore_arg(handle.configs), timing=handle.runtime.timing)
        return clone

    return __deepcopy__


def _check_model(adapter, configs, stages) -> None:
    """Hybrid decoders (sliding-window, linear-attention layers): vision-stage plans only.

    A vision stage prunes before the language model, which then builds every layer type's mask
    and cache itself; in-LLM stages hand layers gathered masks and per-layer cache lengths that
    only full-attention layers understand.
    """
    from vtprune.stages import TowerStage, VisionStage

    types = getattr(adapter.text_config, "layer_types", None) or []
    other = sorted({t for t in types if t != "full_attention"})
    in_llm = [s.key for s in stages if not isinstance(s, (VisionStage, TowerStage))]
    if other and in_llm:
        names = ", ".join(c.name for c in configs)
        raise NotImplementedError(
            f"vtprune: this decoder mixes layer types {sorted(set(types))}; {names} prunes inside the "
            f"language model ({', '.join(in_llm)}), which vtprune supports only when every layer is "
            "full_attention. Use a method that prunes before the language model (hired, visionzip, "
            "random, uniform) on this model"
        )


def remove(model) -> None:
    """Undo ``apply``: every hook goes, the model behaves exactly as before. No-op if not applied."""
    handle = _HANDLES.pop(model, None)
    if handle is not None:
        handle.runtime.remove()
        model.__dict__.pop("__deepcopy__", None)


def handle_of(model) -> Handle | None:
    return _HANDLES.get(model)


def stats(model_or_output) -> PruneStats | None:
    """Token accounting of one request.

    ``stats(model)`` is the last request on ``model`` *made by the calling thread* (``None``
    before any pruned forward in this thread), so threads sharing a model each read their own.
    ``stats(output)``, with the output of a forward or of ``generate(...,
    return_dict_in_generate=True)`` (or its KV cache), is that request's stats, wherever and
    whenever it ran.

    Example:
        >>> vtprune.stats(model).visual_tokens_per_layer  # doctest: +SKIP
        >>> out = model.generate(**inputs, return_dict_in_generate=True)  # doctest: +SKIP
        >>> vtprune.stats(out).keep_ratio  # doctest: +SKIP
    """
    handle = _HANDLES.get(model_or_output) if isinstance(model_or_output, nn.Module) else None
    if handle is not None:
        return handle.runtime.last_stats
    if isinstance(model_or_output, nn.Module):
        raise ValueError("vtprune.stats: no pruning plan is applied to this model (call vtprune.apply first)")
    cache = model_or_output if isinstance(model_or_output, Cache) else compat.output_cache(model_or_output)
    state = state_of_cache(cache)
    if state is None:
        raise ValueError(
            "vtprune.stats: this output carries no pruned request (pass the model, or the output of a "
            "pruned forward / generate(..., return_dict_in_generate=True) that kept its cache)"
        )
    return state.stats


@contextlib.contextmanager
def pruned(model, method, **options):
    """Apply a plan for the duration of a ``with`` block, then restore the previous state.

    Example:
        >>> with vtprune.pruned(model, "fastv", keep=0.5):  # doctest: +SKIP
        ...     out = model.generate(**inputs)
    """
    previous = _HANDLES.get(model)
    handle = apply(model, method, **options)
    try:
        yield handle
    finally:
        remove(model)
        if previous is not None:
            apply(model, _restore_arg(previous.configs), timing=previous.runtime.timing)


def _restore_arg(configs):
    from vtprune.compose import Compose

    return configs[0] if len(configs) == 1 else Compose(*configs)


def _stages_of(cfg, info: ModelInfo) -> list:
    """The config's stages, with its video-budget option handed to its vision stages."""
    stages = cfg.stages(info)
    return cfg.configure_stages(stages) if isinstance(cfg, VideoBudget) else stages
