"""Composition of methods acting at different points (e.g. HiRED before the LLM, then PDrop)."""

from __future__ import annotations

from vtprune.config import MethodConfig


class Compose:
    """Several method configs applied together; each keeps its own options.

    Example:
        >>> from vtprune.methods import PyramidDrop, UniformPrune
        >>> plan = Compose(UniformPrune(keep=0.5), PyramidDrop(ratio=0.5))
        >>> [c.name for c in plan.configs]
        ['uniform', 'pdrop']
    """

    def __init__(self, *configs: MethodConfig):
        if not configs:
            raise ValueError("Compose needs at least one method config")
        for c in configs:
            if not isinstance(c, MethodConfig):
                raise TypeError(f"Compose takes method configs, not {type(c).__name__}")
        self.configs = configs

    def __repr__(self) -> str:
        return f"Compose({', '.join(map(repr, self.configs))})"
