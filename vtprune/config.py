"""Typed method configs, the registry by name, and option validation.

Every method is a dataclass subclassing :class:`MethodConfig`, registered under a short name
with :func:`register_method`. ``vtprune.apply(model, "pdrop", keep=0.25)`` looks the name up
and builds the config from the options; ``vtprune.apply(model, PyramidDrop(keep=0.25))`` passes
the config directly. A config turns into stages with :meth:`MethodConfig.stages` once the model
(its depth) is known.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

REGISTRY: dict[str, type[MethodConfig]] = {}


def register_method(name: str):
    """Class decorator adding a config class to the registry under ``name``.

    Example:
        >>> @register_method("noop")
        ... @dataclass
        ... class NoOp(MethodConfig):
        ...     def stages(self, model_info):
        ...         return []
        >>> "noop" in REGISTRY
        True
        >>> del REGISTRY["noop"]  # keep the example from leaking into the real registry
    """

    def deco(cls):
        cls.name = name
        REGISTRY[name] = cls
        return cls

    return deco


def method_names() -> list[str]:
    return sorted(REGISTRY)


def config_from_name(name: str, **options) -> MethodConfig:
    """Build the registered config ``name`` from keyword options, with errors naming the problem."""
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(method_names())}")
    cls = REGISTRY[name]
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ValueError(
            f"{name}: unknown option(s) {', '.join(unknown)}; options are: {', '.join(sorted(fields))}"
        )
    return cls(**options)


@dataclass(frozen=True)
class ModelInfo:
    """What a config needs to know about the model to resolve its hyper-parameters."""

    num_layers: int
    family: str
    vision_layers: int | None = None  # depth of the vision tower (None: not known)


@dataclass
class MethodConfig:
    """Base of all method configs.

    ``keep`` is the target average fraction of visual tokens per decoder layer (the papers'
    "equivalent tokens" / N); each method resolves its own hyper-parameters to hit it.
    """

    name: ClassVar[str] = "base"
    keep: float | None = None

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        """Every option check (run at construction, and again by ``apply``: a config object
        may have been changed since it was built)."""
        if self.keep is not None:
            check_fraction(self.name, "keep", self.keep)
        if isinstance(self, VideoBudget):
            check_choice(self.name, "video_budget", self.video_budget, VIDEO_BUDGETS)
        self.validate()

    def validate(self) -> None:
        """Check every option's type and the ranges that do not depend on the model.

        Raise ``ValueError`` naming the method, the option, the value and what is allowed (the
        ``check_*`` helpers below word it). Every field of a registered config must be checked
        here: ``tests/test_errors.py`` feeds each one a value of the wrong type.
        """

    def stages(self, model_info: ModelInfo) -> list:
        """The stages implementing this method on a model described by ``model_info``."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, **dataclasses.asdict(self)}

    @classmethod
    def tune_space(cls, info: ModelInfo, keep: float) -> dict[str, list]:
        """``vtprune.tune``'s default search space on a model: option name -> candidate values.

        ``keep`` is fixed by the search (each method resolves the rest of its hyper-parameters
        from it), so only options that may be given together with ``keep`` belong here; a
        method without a space can still be tuned with ``tune(..., space=...)``.
        """
        return {}


VIDEO_BUDGETS = ("clip", "frame")


@dataclass
class VideoBudget(MethodConfig):
    """Base of the image vision-stage methods' configs: how a video's budget is spent.

    ``video_budget="clip"`` (default): one budget, ``round(keep * tokens)``, over the whole clip,
    chosen by the method over all frames at once; ``"frame"``: every frame (Qwen: a temporal
    patch) is pruned alone with ``round(keep * frame tokens)``, so all frames keep the same
    count. Images are unaffected.

    Example:
        >>> from vtprune.methods.divprune import DivPrune
        >>> DivPrune(keep=0.25, video_budget="frame").video_budget
        'frame'
    """

    video_budget: str = "clip"

    def configure_stages(self, stages: list) -> list:
        """Hand the option to this method's vision stages (they run the per-frame loop)."""
        from vtprune.stages import VisionStage  # here: the config module stays free of torch

        for stage in stages:
            if isinstance(stage, VisionStage):
                stage.video_budget = self.video_budget
        return stages


def check_fraction(method: str, option: str, value, *, allow_zero: bool = False) -> None:
    low = "[0, 1]" if allow_zero else "(0, 1]"
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and (0 <= value <= 1 if allow_zero else 0 < value <= 1)
    if not ok:
        raise ValueError(f"{method}: option {option!r}={value!r} is invalid; allowed: a number in {low}")


def check_choice(method: str, option: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(
            f"{method}: option {option!r}={value!r} is invalid; allowed: {', '.join(map(repr, choices))}"
        )


def check_vision_layer(method: str, option: str, value, info: ModelInfo) -> None:
    """A vision-tower layer index (negative counts from the end, as in HF's feature layer)."""
    n = info.vision_layers
    if value is None or n is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not -n <= value < n:
        raise ValueError(
            f"{method}: option {option!r}={value!r} is out of range; allowed: an integer in "
            f"{-n}..{n - 1} for this {n}-layer vision tower"
        )


def check_layer(method: str, option: str, value, num_layers: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= num_layers - 1:
        raise ValueError(
            f"{method}: option {option!r}={value!r} is out of range; allowed: an integer in "
            f"1..{num_layers - 1} for this {num_layers}-layer decoder"
        )


def _invalid(method: str, option: str, value, allowed: str) -> ValueError:
    return ValueError(f"{method}: option {option!r}={value!r} is invalid; allowed: {allowed}")


def check_bool(method: str, option: str, value) -> None:
    """``True`` or ``False`` only (``1``, ``9`` or ``"yes"`` are refused, not read as truthy)."""
    if not isinstance(value, bool):
        raise _invalid(method, option, value, "True or False")


def check_int(
    method: str, option: str, value, *, minimum: int | None = None, maximum: int | None = None
) -> None:
    """An integer (not a bool, not a float such as ``2.0``) within ``[minimum, maximum]``."""
    ok = isinstance(value, int) and not isinstance(value, bool)
    ok = ok and (minimum is None or value >= minimum) and (maximum is None or value <= maximum)
    if not ok:
        if minimum is not None and maximum is not None:
            allowed = f"an integer in {minimum}..{maximum}"
        elif minimum is not None:
            allowed = f"an integer >= {minimum}"
        else:
            allowed = "an integer"
        raise _invalid(method, option, value, allowed)


def check_layer_list(
    method: str, option: str, value, *, minimum: int | None = None, increasing: bool = False
) -> None:
    """A non-empty list (or tuple) of integers (>= ``minimum`` if given; strictly increasing if
    asked). Bounds that depend on the model are checked when the plan is resolved."""
    allowed = "a non-empty list of integers" + (f" >= {minimum}" if minimum is not None else "")
    allowed += ", strictly increasing" if increasing else ""
    if not isinstance(value, (list, tuple)) or not value:
        raise _invalid(method, option, value, allowed)
    for item in value:
        if isinstance(item, bool) or not isinstance(item, int) or (minimum is not None and item < minimum):
            raise _invalid(method, option, value, allowed)
    if increasing and list(value) != sorted(set(value)):
        raise ValueError(f"{method}: option {option!r}={value!r} must be strictly increasing")
