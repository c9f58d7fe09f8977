"""Random and uniform (spatially strided) selection before the language model.

Independent benchmarks find these strong baselines, so every comparison includes them. Both
act at the vision stage: the dropped image tokens never enter the language model.

Each image keeps ``round(keep * n)`` of its ``n`` tokens. LLaVA-NeXT row-newline tokens are
kept by default (``protect_newlines``) and count towards that budget, so the 2-D row structure
the model was trained with survives; the rest of the budget goes to patches, split over the
image's grids (base image, crop region, video frames) in proportion to their size.

``recycle="nearest"`` folds the dropped tokens into their most similar kept ones instead;
``recycle="clusters"`` spends a tenth of the budget on DPC-kNN cluster means of the dropped
tokens, placed at their centres (``vtprune.recycling``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vtprune.config import ModelInfo, VideoBudget, check_bool, check_int, register_method
from vtprune.images import ImageView
from vtprune.recycling import check_recycle
from vtprune.selection import split_budget, strided_grid
from vtprune.stages import VisionStage


@register_method("random")
@dataclass
class RandomPrune(VideoBudget):
    """Keep a random subset of each image's tokens (seeded, so runs repeat exactly).

    Example:
        >>> RandomPrune(keep=0.25, seed=1).keep
        0.25
    """

    seed: int = 0
    protect_newlines: bool = True
    recycle: str = "none"

    def validate(self) -> None:
        check_int(self.name, "seed", self.seed, minimum=0, maximum=2**32 - 1)
        check_bool(self.name, "protect_newlines", self.protect_newlines)
        check_recycle(self.name, self.recycle)

    def stages(self, info: ModelInfo) -> list:
        keep = 0.5 if self.keep is None else self.keep
        return [ImageBudgetStage("random", keep, self.protect_newlines, self.seed, self.recycle)]


@register_method("uniform")
@dataclass
class UniformPrune(VideoBudget):
    """Keep tokens on an evenly strided 2-D lattice of each image grid.

    Example:
        >>> UniformPrune(keep=0.25).keep
        0.25
    """

    protect_newlines: bool = True
    recycle: str = "none"

    def validate(self) -> None:
        check_bool(self.name, "protect_newlines", self.protect_newlines)
        check_recycle(self.name, self.recycle)

    def stages(self, info: ModelInfo) -> list:
        keep = 0.5 if self.keep is None else self.keep
        return [ImageBudgetStage("uniform", keep, self.protect_newlines, recycle=self.recycle)]


class ImageBudgetStage(VisionStage):
    def __init__(self, kind: str, keep: float, protect_newlines: bool, seed: int = 0, recycle: str = "none"):
        self.kind, self.keep, self.protect_newlines, self.seed = kind, keep, protect_newlines, seed
        self.recycle = recycle
        self.key = kind

    def expected_count(self, n_image: int) -> int:
        return int(n_image * self.keep + 0.5)

    def pick(self, view: ImageView, budget: int) -> torch.Tensor:
        """Indices (within the image's tokens) to keep: ``budget`` of them, newlines first."""
        lay = view.layout  # structure only: everything here is host-side index arithmetic
        fixed = (
            torch.nonzero(lay.newline).flatten()
            if self.protect_newlines
            else torch.zeros(0, dtype=torch.long)
        )
        budget = max(0, budget - fixed.numel())
        if self.kind == "random":
            # seeded per image by its place in its own row: a prompt draws the same tokens alone
            # or inside any batch
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + view.index)
            candidates = torch.nonzero(~lay.newline).flatten()
            chosen = candidates[torch.randperm(candidates.numel(), generator=gen)[:budget]]
        else:
            parts = split_budget(budget, [s.size for s in view.segments])
            chosen = torch.cat(
                [s.indices()[strided_grid(s.rows, s.cols, k)] for s, k in zip(view.segments, parts)]
                or [torch.zeros(0, dtype=torch.long)]
            )
        return torch.cat([fixed, chosen]).sort().values
