"""Built-in methods; importing this package registers them by name."""

from .baselines import RandomPrune, UniformPrune
from .fastv import FastV
from .hired import HiRED
from .pdrop import PyramidDrop
from .visionzip import VisionZip

__all__ = ["FastV", "HiRED", "PyramidDrop", "RandomPrune", "UniformPrune", "VisionZip"]
