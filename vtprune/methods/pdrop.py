"""PyramidDrop: drop a fixed share of visual tokens at each stage boundary.

Boundary ``b`` keeps ``int(N * ratio**s)`` of the N visual tokens entering the language model
(s = 1, 2, ... for successive boundaries). Scores use layer ``b``'s own ``input_layernorm``,
``q_proj``/``k_proj`` and rotary tables applied to layer ``b-1``'s output: the last
instruction token's attention (fp32 softmax over all visible keys, K/V heads repeated for GQA,
mean over heads) onto the visual tokens. With ``labels`` (training), the queries are the
tokens just before each answer span, averaged. Kept tokens keep their original positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vtprune.config import (
    MethodConfig,
    ModelInfo,
    check_fraction,
    check_layer,
    check_layer_list,
    register_method,
)
from vtprune.scoring import layer_query_probs
from vtprune.search import increasing_lists, layer_candidates
from vtprune.selection import count_for_fraction, pyramid_ratio, scale_layers, slots_of, topk_mask
from vtprune.stages import PrefillContext, PrefillStage

DEFAULT_LAYERS = [8, 16, 24]  # for a 32-layer decoder; scaled by depth
EARLY_LAYERS = [2, 8, 16]  # the authors' advice for low token budgets


@register_method("pdrop")
@dataclass
class PyramidDrop(MethodConfig):
    """PyramidDrop (Xing et al., 2024).

    Args:
        layers: stage boundaries (default ``[8, 16, 24]`` scaled to the model's depth).
        ratio: lambda, the fraction kept at each boundary (default 0.5).
        keep: target layer-average fraction; solves ``ratio`` for it (and switches to the
            earlier boundaries ``[2, 8, 16]`` when the default ones cannot go that low).

    Example:
        >>> layers, ratio = PyramidDrop(keep=0.25).resolve(ModelInfo(num_layers=32, family="llava"))
        >>> layers, round(ratio, 3)
        ([2, 8, 16], 0.46)
    """

    layers: list[int] | None = None
    ratio: float | None = None

    def validate(self) -> None:
        if self.ratio is not None:
            check_fraction(self.name, "ratio", self.ratio)
            if self.keep is not None:
                raise ValueError("pdrop: give either 'keep' or 'ratio', not both")
        if self.layers is not None:
            check_layer_list(self.name, "layers", self.layers, increasing=True)  # range: at resolve

    @classmethod
    def tune_space(cls, info: ModelInfo, keep: float) -> dict[str, list]:
        """Stage boundaries for ``vtprune.tune``: two to four of them, the first early enough for
        ``keep``; the ratio is then solved for ``keep``."""
        cands = layer_candidates(info.num_layers)
        return {"layers": increasing_lists(cands, (2, 3, 4), first_below=keep * info.num_layers)}

    def resolve(self, info: ModelInfo) -> tuple[list[int], float]:
        n = info.num_layers
        layers = list(self.layers) if self.layers is not None else scale_layers(DEFAULT_LAYERS, n)
        for layer in layers:
            check_layer(self.name, "layers", layer, n)
        if self.keep is None:
            return layers, 0.5 if self.ratio is None else self.ratio
        if self.keep <= layers[0] / n:
            if self.layers is not None or self.keep <= scale_layers(EARLY_LAYERS, n)[0] / n:
                raise ValueError(
                    f"pdrop: keep={self.keep} is unreachable with layers={layers} on {n} layers (layers before "
                    f"the first boundary keep everything: keep must exceed {layers[0] / n:.4f}); use earlier 'layers'"
                )
            layers = scale_layers(EARLY_LAYERS, n)
        return layers, pyramid_ratio(self.keep, layers, n)

    def stages(self, info: ModelInfo) -> list:
        layers, ratio = self.resolve(info)
        return [PyramidDropStage(layer, ratio**s) for s, layer in enumerate(layers, start=1)]


class PyramidDropStage(PrefillStage):
    def __init__(self, layer: int, fraction: float):
        self.layer, self.fraction = layer, fraction
        self.key = f"pdrop@{layer}"

    def expected_count(self, n_in: int, n_current: int) -> int:
        return int(count_for_fraction(torch.tensor([n_in]), self.fraction, mode="floor"))

    def scores(self, ctx: PrefillContext) -> torch.Tensor:
        """``[B, L]``: the attention of the last instruction token (with ``labels``: the mean of the
        tokens before each answer span) onto every slot, scored with layer ``layer``'s own norm and
        q/k projections on layer ``layer - 1``'s output (VScan's prefill stage reuses it)."""
        queries = ctx.query_slot.unsqueeze(1)
        if ctx.answer_query is not None and bool(ctx.answer_query.any()):
            queries = slots_of(ctx.answer_query)
        probs = layer_query_probs(ctx.layers[self.layer], ctx.hidden, ctx.cos, ctx.sin, ctx.valid, queries)
        return probs.sum(1) / (queries >= 0).sum(1, keepdim=True).clamp(min=1)

    def count(self, ctx: PrefillContext) -> torch.Tensor:
        """``[B]`` visual tokens kept per row: ``int(N * fraction)``."""
        return count_for_fraction(ctx.visual_in, self.fraction, mode="floor")

    def select(self, ctx: PrefillContext) -> torch.Tensor:
        return topk_mask(self.scores(ctx), ctx.visual, self.count(ctx))
