"""Built-in methods; importing this package registers them by name."""

from .baselines import RandomPrune, UniformPrune
from .cdpruner import CDPruner
from .dart import DART
from .divprune import DivPrune
from .fastv import FastV
from .flowcut import FlowCut
from .hired import HiRED
from .layerskip import LayerSkip
from .mustdrop import MustDrop
from .pdrop import PyramidDrop
from .prefixkv import PrefixKV
from .sparsevlm import SparseVLM
from .temporal import Temporal
from .todre import ToDRE
from .transprune import TransPrune
from .vflowopt import VFlowOpt
from .visionzip import VisionZip
from .vscan import VScan
from .zerotprune import ZeroTPrune

__all__ = [
    "CDPruner",
    "DART",
    "DivPrune",
    "FastV",
    "FlowCut",
    "HiRED",
    "LayerSkip",
    "MustDrop",
    "PrefixKV",
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
]
