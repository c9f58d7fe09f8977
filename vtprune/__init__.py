"""vtprune: prune and skip visual tokens in Hugging Face vision-language models.

Example:
    >>> import vtprune
    >>> handle = vtprune.apply(model, "pdrop", keep=0.25)  # doctest: +SKIP
    >>> model.generate(**inputs)  # doctest: +SKIP
    >>> vtprune.stats(model).visual_tokens_per_layer  # doctest: +SKIP
    >>> vtprune.remove(model)  # doctest: +SKIP
"""

from vtprune.compat import check_transformers

check_transformers()

from vtprune import methods as _methods  # noqa: E402,F401  (registers the built-in methods)
from vtprune.api import Handle, apply, pruned, remove, stats  # noqa: E402
from vtprune.calibration import HeadMask, calibrate  # noqa: E402
from vtprune.compose import Compose  # noqa: E402
from vtprune.config import REGISTRY, MethodConfig, method_names, register_method  # noqa: E402
from vtprune.kv_profile import PrefixKVProfile, profile_prefixkv  # noqa: E402
from vtprune.methods import (  # noqa: E402
    DART,
    DivPrune,
    FastV,
    FlowCut,
    HiRED,
    LayerSkip,
    MustDrop,
    PrefixKV,
    PyramidDrop,
    RandomPrune,
    SparseVLM,
    Temporal,
    ToDRE,
    TransPrune,
    UniformPrune,
    VFlowOpt,
    VisionZip,
    VScan,
    ZeroTPrune,
)
from vtprune.runtime.state import replay  # noqa: E402
from vtprune.stats import PruneStats  # noqa: E402
from vtprune.tune import TuneResult, load_plan, tune  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "REGISTRY",
    "Compose",
    "DART",
    "DivPrune",
    "FastV",
    "FlowCut",
    "HiRED",
    "LayerSkip",
    "MustDrop",
    "Handle",
    "HeadMask",
    "MethodConfig",
    "PrefixKV",
    "PrefixKVProfile",
    "PruneStats",
    "PyramidDrop",
    "RandomPrune",
    "SparseVLM",
    "Temporal",
    "ToDRE",
    "TransPrune",
    "UniformPrune",
    "VFlowOpt",
    "VisionZip",
    "VScan",
    "ZeroTPrune",
    "apply",
    "calibrate",
    "method_names",
    "profile_prefixkv",
    "pruned",
    "register_method",
    "remove",
    "replay",
    "stats",
    "TuneResult",
    "load_plan",
    "tune",
]
