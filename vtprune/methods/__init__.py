"""Built-in methods; importing this package registers them by name."""

from .baselines import RandomPrune, UniformPrune
from .cdpruner import CDPruner
from .divprune import DivPrune
from .fastv import FastV
from .hired import HiRED
from .layerskip import LayerSkip
from .mustdrop import MustDrop
from .pdrop import PyramidDrop
from .temporal import Temporal
from .todre import ToDRE
from .visionzip import VisionZip

__all__ = [
    "CDPruner",
    "DivPrune",
    "FastV",
    "HiRED",
    "LayerSkip",
    "MustDrop",
    "PyramidDrop",
    "RandomPrune",
    "Temporal",
    "ToDRE",
    "UniformPrune",
    "VisionZip",
]
