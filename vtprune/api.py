"""The public entry points: ``apply``, ``remove``, ``stats``, ``pruned``."""

from __future__ import annotations

import contextlib
import weakref

from vtprune.config import MethodConfig, ModelInfo, config_from_name
from vtprune.integrations import adapter_for
from vtprune.runtime.engine import Runtime
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
        remove(self.model)

    @property
    def stats(self) -> PruneStats | None:
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


def apply(model, method, **options) -> Handle:
    """Prune visual tokens of ``model`` (an instance; classes are never patched).

    Args:
        model: a LLaVA-1.5, LLaVA-NeXT or Qwen2-VL model (``*ForConditionalGeneration`` or
            its inner ``*Model``).
        method: a registered name (``"fastv"``, ``"pdrop"``, ``"random"``, ``"uniform"``, ...)
            or a config object (``vtprune.PyramidDrop(keep=0.25)``, ``vtprune.Compose(...)``).
        **options: the method's options when ``method`` is a name, e.g. ``keep=0.25``.

    Applying again replaces the previous plan.

    Example:
        >>> handle = vtprune.apply(model, "pdrop", keep=0.25)  # doctest: +SKIP
        >>> out = model.generate(**inputs)  # doctest: +SKIP
    """
    configs = _configs(method, options)
    adapter = adapter_for(model)
    _check_model(adapter)
    info = ModelInfo(num_layers=adapter.num_layers, family=adapter.family)
    stages = [stage for cfg in configs for stage in cfg.stages(info)]
    keys = [s.key for s in stages]
    if len(set(keys)) != len(keys):
        raise ValueError(f"two stages act at the same point with the same method: {keys}")
    remove(model)
    runtime = Runtime(model, adapter, stages)
    runtime.install()
    handle = Handle(model, configs, runtime, stages)
    _HANDLES[model] = handle
    return handle


def _check_model(adapter) -> None:
    types = getattr(adapter.text_config, "layer_types", None) or []
    if any(t != "full_attention" for t in types):
        raise NotImplementedError(
            f"vtprune: decoders with sliding-window or other non-full attention layers are not supported ({sorted(set(types))})"
        )


def remove(model) -> None:
    """Undo ``apply``: every hook goes, the model behaves exactly as before. No-op if not applied."""
    handle = _HANDLES.pop(model, None)
    if handle is not None:
        handle.runtime.remove()


def handle_of(model) -> Handle | None:
    return _HANDLES.get(model)


def stats(model) -> PruneStats | None:
    """Token accounting of the last prefill of ``model`` (``None`` before any pruned forward).

    Example:
        >>> vtprune.stats(model).visual_tokens_per_layer  # doctest: +SKIP
    """
    handle = _HANDLES.get(model)
    if handle is None:
        raise ValueError("vtprune.stats: no pruning plan is applied to this model (call vtprune.apply first)")
    return handle.runtime.last_stats


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
            apply(model, _restore_arg(previous.configs))


def _restore_arg(configs):
    from vtprune.compose import Compose

    return configs[0] if len(configs) == 1 else Compose(*configs)
