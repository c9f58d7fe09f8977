"""FastV: after layer K, keep the visual tokens the last query attends to most.

Layers ``0..K-1`` see every token; before layer ``K`` the top ``ratio`` of visual tokens by the
attention of the last query row at layer ``K-1`` (mean over heads) survive, in original order.
``score="mean"`` averages the attention received from all text queries instead (the paper's
wording; the official code uses the last row, our default).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vtprune.config import (
    MethodConfig,
    ModelInfo,
    check_choice,
    check_fraction,
    check_int,
    check_layer,
    register_method,
)
from vtprune.scoring import projected_query_probs
from vtprune.search import layer_candidates
from vtprune.selection import count_for_fraction, fastv_ratio, slots_of, topk_mask
from vtprune.stages import PrefillContext, PrefillStage

DEFAULT_LAYER = 2  # the paper's K


@register_method("fastv")
@dataclass
class FastV(MethodConfig):
    """FastV (Chen et al., 2024).

    Args:
        layer: K, the first decoder layer that sees the pruned sequence (default 2, lowered
            automatically when ``keep`` is too small for it on a shallow model).
        ratio: fraction of visual tokens kept from layer K on (default 0.5 = the paper's R=50%).
        keep: target layer-average fraction; resolves ``ratio`` (give one of ``keep``/``ratio``).
        score: ``"last"`` (last query row, as the official code) or ``"mean"`` (all text queries).

    Example:
        >>> layer, ratio = FastV(layer=2, keep=0.5).resolve(ModelInfo(num_layers=32, family="llava"))
        >>> layer, round(ratio, 4)  # (2 + 30 * ratio) / 32 == 0.5
        (2, 0.4667)
    """

    layer: int | None = None
    ratio: float | None = None
    score: str = "last"

    def validate(self) -> None:
        validate_layer_ratio(self)
        check_choice(self.name, "score", self.score, ("last", "mean"))

    @classmethod
    def tune_space(cls, info: ModelInfo, keep: float) -> dict[str, list]:
        """``layer`` (early enough for ``keep``) and ``score`` for ``vtprune.tune``."""
        layers = [x for x in layer_candidates(info.num_layers) if x < keep * info.num_layers]
        return {"layer": layers or [1], "score": ["last", "mean"]}

    def resolve(self, info: ModelInfo) -> tuple[int, float]:
        return resolve_layer_ratio(self.name, self.layer, self.keep, self.ratio, info.num_layers)

    def stages(self, info: ModelInfo) -> list:
        layer, ratio = self.resolve(info)
        return [FastVStage(layer=layer, ratio=ratio, score=self.score)]


class FastVStage(PrefillStage):
    needs_previous_input = True

    def __init__(self, layer: int, ratio: float, score: str):
        self.layer, self.ratio, self.score = layer, ratio, score
        self.key = f"fastv@{layer}"

    def expected_count(self, n_in: int, n_current: int) -> int:
        return int(count_for_fraction(torch.tensor([n_in]), self.ratio))

    def select(self, ctx: PrefillContext) -> torch.Tensor:
        prev = ctx.layers[self.layer - 1]
        if self.score == "last":
            queries = ctx.query_slot.unsqueeze(1)
        else:
            queries = text_query_slots(ctx.visual, ctx.valid)
        probs = projected_query_probs(prev.self_attn, *ctx.previous_qk, ctx.cos, ctx.sin, ctx.valid, queries)
        scores = probs.sum(1) / (queries >= 0).sum(1, keepdim=True).clamp(min=1)
        k = count_for_fraction(ctx.visual_in, self.ratio)
        return topk_mask(scores, ctx.visual, k)


def validate_layer_ratio(cfg: MethodConfig) -> None:
    """Check a config's FastV-style ``layer`` / ``ratio`` / ``keep`` options (FastV, DART): ``layer``
    an integer (its range depends on the depth, checked at resolve), ``ratio`` a fraction, and
    not both ``keep`` and ``ratio``."""
    if cfg.layer is not None:
        check_int(cfg.name, "layer", cfg.layer)
    if cfg.ratio is not None:
        check_fraction(cfg.name, "ratio", cfg.ratio)
        if cfg.keep is not None:
            raise ValueError(f"{cfg.name}: give either 'keep' or 'ratio', not both")


def resolve_layer_ratio(
    name: str,
    layer: int | None,
    keep: float | None,
    ratio: float | None,
    num_layers: int,
    default_ratio: float = 0.5,
) -> tuple[int, float]:
    """``(K, ratio)`` of a method that prunes once before layer K (FastV, DART).

    ``layer=None`` is :data:`DEFAULT_LAYER`, lowered when ``keep`` is too small for it on a shallow
    model; ``keep`` resolves ``ratio`` by the layer-average formula (:func:`fastv_ratio`);
    with neither, ``ratio`` is ``default_ratio``.
    """
    n = num_layers
    if layer is None:
        layer = DEFAULT_LAYER
        if keep is not None and keep * n <= layer:
            layer = max(1, math.ceil(keep * n) - 1)  # the deepest K that still reaches keep
    check_layer(name, "layer", layer, n)
    if keep is None:
        return layer, default_ratio if ratio is None else ratio
    ratio = fastv_ratio(keep, layer, n)
    if ratio <= 0:
        raise ValueError(
            f"{name}: keep={keep} is unreachable with layer={layer} on {n} layers "
            f"(layers before K keep everything: keep must exceed {layer / n:.4f}); "
            "lower 'layer' or raise 'keep'"
        )
    return layer, ratio


def text_query_slots(visual: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``[B, Q]`` slots of the valid text tokens after each row's first visual token (-1 padded)."""
    return slots_of(visual.long().cummax(1).values.bool() & ~visual & valid)
