"""TransPrune: rank visual tokens by how much the decoder transforms them, plus the prompt's attention.

Li et al., "TransPrune: Token Transition Pruning for Efficient Large Vision-Language Model"
(CVPR 2026), as the official LLaVA code does it:

* **Token transition variation (TTV)** of a sub-layer (attention or MLP) with normed input
  ``x`` and output ``y`` (before the residual add): ``||y|| / ||x||`` (magnitude) times
  ``softmax(1 - cos(x, y))`` over the sequence (direction). A layer's TTV is the sum of its two
  sub-layers'; it accumulates over the ``window`` layers seen so far (official 1-indexed
  7..12, i.e. layers 6..11 here).
* **Instruction-guided attention (IGA)** at each prune point: the attention the text tokens after
  the image pay to each visual token, mean over heads and over those rows, from the next layer's
  own norm, q/k projections and rotary tables (official: eager attention there). Here those rows
  are recomputed beside SDPA (``vtprune.scoring.layer_query_probs``); the matrix is never built.
* **Score** ``TTV / sum(TTV) + IGA / sum(IGA)`` over the visual tokens; before each boundary in
  ``layers`` (official 7, 9, 12) the top ``ratios[s] * N`` visual tokens stay (official
  ``[0.875, 0.625, 0.125]``: 41% of N on average over LLaVA-1.5's 32 layers). ``score="ttv"``
  ranks by TTV alone (the paper's attention-free variant), ``score="iga"`` by IGA alone.

TTV needs no attention weights: ``vtprune.runtime.taps`` hooks the attention and MLP modules of
the window layers only, reduces each output to one number per token at once and keeps only the
visual tokens' values (summed per original position, so they follow the tokens across drops).

Deviations from the official code:

* The direction softmax runs per row over that row's real tokens (text and visual, padding
  excluded); the official code normalises over every token of the whole batch, which is only
  what it means at batch size 1, where the two agree.
* Kept tokens keep their original (M-RoPE) positions; the official code re-indexes them.
* A row with no text after its image takes its last token as the instruction row.
* ``keep`` (the layer-average fraction) scales the official ratios by one factor (each capped at
  1), solved by bisection. Below the official operating point the boundaries move earlier:
  ``[2, 4, 7]`` (of 32 layers, window 1..6) is used when its own average is nearer to ``keep``
  than the official schedule's, since the official first boundary alone holds every token for
  7/32 = 22% of the layers. Boundaries are scaled to the model's depth.
* Counts are ``round(ratio * N)`` (official ``int``), so ``keep`` is met on small images.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vtprune.config import (
    MethodConfig,
    ModelInfo,
    _invalid,
    check_choice,
    check_layer,
    check_layer_list,
    register_method,
)
from vtprune.scoring import layer_query_probs
from vtprune.selection import count_for_fraction, fit_schedule, scale_layers, schedule_average, topk_mask
from vtprune.stages import PrefillContext, PrefillStage, SublayerTap

from .fastv import text_query_slots

DEFAULT_LAYERS = [7, 9, 12]  # the first layer that sees each pruned set (official pruning_layer_list)
EARLY_LAYERS = [2, 4, 7]  # the same shape moved earlier, for budgets below the official one
DEFAULT_RATIOS = [0.875, 0.625, 0.125]  # official image_token_ratio_list after each boundary
SCORES = ("ttv+iga", "ttv", "iga")
EPS = 1e-8  # the official code's guard on both normalisations


@register_method("transprune")
@dataclass
class TransPrune(MethodConfig):
    """TransPrune (Li et al., CVPR 2026): token transition variation plus instruction attention.

    Args:
        keep: target layer-average fraction; scales ``ratios`` by one factor (give ``keep`` or
            ``ratios``, not both).
        layers: the first layer that sees each pruned set (default ``[7, 9, 12]`` for 32 layers,
            scaled by depth; ``[2, 4, 7]`` when ``keep`` is nearer that schedule's average).
        ratios: fraction of N kept from each boundary on, non-increasing (default
            ``[0.875, 0.625, 0.125]``), one per boundary.
        window: layers whose TTV accumulates (default: from the layer before the first boundary
            to the layer before the last); each must come before the last boundary.
        score: ``"ttv+iga"`` (official), ``"ttv"`` (attention-free) or ``"iga"``.

    Example:
        >>> bounds, window, fractions = TransPrune().resolve(ModelInfo(num_layers=32, family="llava"))
        >>> bounds, window, [round(f * 576) for f in fractions]
        ([7, 9, 12], [6, 7, 8, 9, 10, 11], [504, 360, 72])
        >>> bounds, _, fractions = TransPrune(keep=0.25).resolve(ModelInfo(num_layers=32, family="llava"))
        >>> bounds, round(schedule_average(bounds, fractions, 32), 4)
        ([2, 4, 7], 0.25)
    """

    layers: list[int] | None = None
    ratios: list[float] | None = None
    window: list[int] | None = None
    score: str = "ttv+iga"

    @classmethod
    def tune_space(cls, info: ModelInfo, keep: float) -> dict[str, list]:
        """The score (TTV, instruction attention or both) for ``vtprune.tune``; its boundaries
        follow ``keep``."""
        return {"score": ["ttv+iga", "ttv", "iga"]}

    def validate(self) -> None:
        if self.layers is not None:
            check_layer_list(self.name, "layers", self.layers, minimum=1, increasing=True)
        if self.ratios is not None:
            allowed = "a non-empty, non-increasing list of numbers in (0, 1]"
            ratios = self.ratios
            ok = isinstance(ratios, (list, tuple)) and bool(ratios)
            ok = ok and all(
                isinstance(r, (int, float)) and not isinstance(r, bool) and 0 < r <= 1 for r in ratios
            )
            if not ok or list(ratios) != sorted(ratios, reverse=True):
                raise _invalid(self.name, "ratios", ratios, allowed)
            if self.keep is not None:
                raise ValueError(f"{self.name}: give either 'keep' or 'ratios', not both")
        if self.window is not None:
            check_layer_list(self.name, "window", self.window, minimum=0, increasing=True)
        check_choice(self.name, "score", self.score, SCORES)
        shape = self.ratios if self.ratios is not None else DEFAULT_RATIOS
        if self.layers is not None and len(self.layers) != len(shape):
            raise ValueError(
                f"{self.name}: option 'layers'={self.layers!r} has {len(self.layers)} boundaries but there are "
                f"{len(shape)} ratios; give one ratio per boundary"
            )

    def boundaries(self, info: ModelInfo) -> list[int]:
        """The first layer that sees each pruned set, on this model."""
        n = info.num_layers
        shape = list(self.ratios) if self.ratios is not None else DEFAULT_RATIOS
        if self.layers is not None:
            for layer in self.layers:
                check_layer(self.name, "layers", layer, n)
            return list(self.layers)
        options = [
            b
            for b in (scale_layers(DEFAULT_LAYERS, n), scale_layers(EARLY_LAYERS, n))
            if len(b) == len(shape)
        ]
        if not options:
            raise ValueError(
                f"{self.name}: a {n}-layer decoder is too shallow for {len(shape)} boundaries; give 'layers'"
            )
        if self.keep is None:
            return options[0]
        reachable = [b for b in options if self.keep > b[0] / n] or options
        return min(
            reachable, key=lambda b: abs(schedule_average(b, [min(1.0, r) for r in shape], n) - self.keep)
        )

    def resolve(self, info: ModelInfo) -> tuple[list[int], list[int], list[float]]:
        """``(boundaries, window, fractions)``: the fraction of N each boundary leaves."""
        n = info.num_layers
        bounds = self.boundaries(info)
        shape = list(self.ratios) if self.ratios is not None else DEFAULT_RATIOS
        window = list(self.window) if self.window is not None else list(range(bounds[0] - 1, bounds[-1]))
        for layer in window:
            if layer >= bounds[-1]:
                raise ValueError(
                    f"{self.name}: option 'window'={window!r} is out of range; allowed: layers in 0..{bounds[-1] - 1} "
                    f"(before the last boundary {bounds[-1]}: later layers inform no pruning)"
                )
        if self.score != "iga" and window[0] >= bounds[0]:
            raise ValueError(
                f"{self.name}: option 'window'={window!r} starts after the first boundary {bounds[0]}, so score="
                f"{self.score!r} has no TTV there; start the window before layer {bounds[0]}"
            )
        if self.keep is None:
            return bounds, window, list(shape)
        if self.keep <= bounds[0] / n:
            raise ValueError(
                f"{self.name}: keep={self.keep} is unreachable with layers={bounds} on {n} layers (layers before the "
                f"first boundary keep everything: keep must exceed {bounds[0] / n:.4f}); use earlier 'layers'"
            )
        return bounds, window, fit_schedule(bounds, shape, self.keep, n)

    def stages(self, info: ModelInfo) -> list:
        bounds, window, fractions = self.resolve(info)
        tap = TransitionTap(window) if self.score != "iga" else None
        return [TransPruneStage(b, f, self.score, tap) for b, f in zip(bounds, fractions)]


@torch.no_grad()
def transition_variation(x_in: torch.Tensor, x_out: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per-token TTV of one sub-layer: ``||y|| / ||x|| * softmax_row(1 - cos(x, y))``.

    Args:
        x_in, x_out: the sub-layer's input and output ``[B, L, D]``.
        valid: ``[B, L]`` the row's real tokens; the softmax runs over them, 0 elsewhere.

    Returns:
        ``[B, L]`` float32.

    Example:
        >>> x = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]])
        >>> y = torch.tensor([[[2.0, 0.0], [0.0, 1.0], [5.0, 5.0]]])
        >>> ttv = transition_variation(x, y, torch.tensor([[True, True, False]]))
        >>> [round(v, 4) for v in ttv[0].tolist()]  # 2 * e^0 / (e^0 + e^1), 1 * e^1 / (e^0 + e^1)
        [0.5379, 0.7311, 0.0]
    """
    x, y = x_in.float(), x_out.float()
    ratio = torch.linalg.vector_norm(y, dim=-1) / torch.linalg.vector_norm(x, dim=-1).clamp(min=EPS)
    turn = 1 - F.cosine_similarity(x, y, dim=-1)
    direction = turn.masked_fill(~valid, float("-inf")).softmax(-1).nan_to_num(0)
    return ratio * direction


class TransitionTap(SublayerTap):
    """Accumulates each visual token's TTV over the window layers, by original position."""

    key = "transprune:ttv"

    def __init__(self, window: list[int]):
        self.layers = tuple(window)

    def observe(self, memory, layer, kind, x_in, x_out, token_set, orig_len) -> None:
        ttv = transition_variation(x_in, x_out, token_set.valid)
        acc = memory.get("ttv")
        if acc is None:
            acc = memory["ttv"] = torch.zeros(ttv.shape[0], orig_len + 1, device=ttv.device)
        # visual tokens only; everything else lands in the spare last column
        at = torch.where(token_set.visual, token_set.orig_index, orig_len)
        acc.scatter_add_(1, at, ttv.masked_fill(~token_set.visual, 0))


class TransPruneStage(PrefillStage):
    """Keeps ``fraction * N`` visual tokens before layer ``layer`` by TTV and/or IGA."""

    def __init__(self, layer: int, fraction: float, score: str, tap: TransitionTap | None):
        self.layer, self.fraction, self.score, self.tap = layer, fraction, score, tap
        self.key = f"transprune@{layer}"

    def expected_count(self, n_in: int, n_current: int) -> int:
        return min(n_current, int(count_for_fraction(torch.tensor([n_in]), self.fraction)))

    def select(self, ctx: PrefillContext) -> torch.Tensor:
        score = torch.zeros(ctx.visual.shape, device=ctx.hidden.device)
        acc = (ctx.tapped or {}).get("ttv")
        if acc is not None:  # None: no window layer ran (nothing was visual there)
            orig_len = acc.shape[1] - 1
            at = torch.where(ctx.visual, ctx.orig_index, orig_len).to(acc.device)
            score += _share(acc.gather(1, at), ctx.visual)
        if self.score != "ttv":
            queries = text_query_slots(ctx.visual, ctx.valid)
            # a row with no text after its image asks with its last token
            none = (queries < 0).all(1)
            queries[:, 0] = torch.where(none, ctx.query_slot, queries[:, 0])
            probs = layer_query_probs(
                ctx.layers[self.layer], ctx.hidden, ctx.cos, ctx.sin, ctx.valid, queries
            )
            score += _share(probs.sum(1), ctx.visual)
        k = count_for_fraction(ctx.visual_in, self.fraction).minimum(ctx.visual.sum(1))
        return topk_mask(score, ctx.visual, k)


def _share(values: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
    """Each visual token's share of its row's total (the official ``x / (sum + 1e-8)``)."""
    v = values.float().masked_fill(~visual, 0)
    return v / (v.sum(1, keepdim=True) + EPS)
