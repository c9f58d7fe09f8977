"""Built-in methods; importing this package registers them by name."""

from .baselines import RandomPrune, UniformPrune
from .fastv import FastV
from .pdrop import PyramidDrop

__all__ = ["FastV", "PyramidDrop", "RandomPrune", "UniformPrune"]
