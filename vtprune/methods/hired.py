"""HiRED: a token budget spent where the vision encoder's CLS token looks, before the LLM.

Partitions are the vision-tower inputs of an image (LLaVA-NeXT: the base image and each grid
crop, ``N`` patch tokens each; LLaVA-1.5 and Qwen2-VL: one partition). The patch budget is
``int(P * N * budget)`` (or follows ``keep``). The base image gets ``min(int(total * alpha), N)``
tokens by its CLS attention at the selection layer (the layer LLaVA's features come from); the
rest is shared by the crops in proportion to how many of the base image's top
``N * (1 - alpha)`` tokens by CLS attention at the split layer (0) fall in each crop's region,
the true ``rows x cols`` spatial blocks of the base grid (the official code cuts horizontal
bands). Each crop keeps its top tokens by its own selection-layer score.

Decisions:

* LLaVA-NeXT newline tokens are kept by default (``drop_newlines=True`` drops them as the
  official code does).
* The crops' share of the budget is split by largest remainder (``selection.allocate``: floors
  first, then one more token to the crops with the largest fractional parts, capped by what a
  crop holds). The official code floors each crop's share, so it keeps up to ``crops - 1``
  tokens fewer than its own total; ours spends the total exactly.
* A crop's candidates are its tokens that survive LLaVA-NeXT's unpadding. The official code
  picks each crop's top tokens over the whole crop and then loses those that fall in the
  padding, so padded images keep fewer tokens than budgeted; here the budget goes to tokens
  the language model sees.
* Qwen2-VL has no CLS token: its score is the attention a token receives from all patches of
  its image in the chosen tower block (``ImageView.cls_scores``, ``vtprune.runtime.vision``).
  LLaVA-OneVision has none either (the same substitute, per SigLIP crop); its videos have no base
  image to split the budget by, so a clip's frames are scored as one set. On these towers
  ``score="wpr"`` ranks by Zero-TPrune's weighted PageRank of the block's head-mean attention
  map instead (``vtprune.attention_graph``); towers with CLS refuse it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vtprune.attention_graph import TOWER_SCORES
from vtprune.config import (
    ModelInfo,
    VideoBudget,
    check_bool,
    check_choice,
    check_fraction,
    check_int,
    check_vision_layer,
    register_method,
)
from vtprune.images import ImageView
from vtprune.recycling import check_recycle
from vtprune.selection import allocate
from vtprune.stages import VisionStage


@register_method("hired")
@dataclass
class HiRED(VideoBudget):
    """HiRED (Arif et al., 2024).

    Args:
        budget: fraction of all partition tokens kept (official default 0.2); or use ``keep``.
        alpha: share of the budget given to the base image (default 0.5).
        split_layer: tower layer whose CLS attention splits the budget over crops (default 0).
        select_layer: tower layer whose CLS attention selects tokens (default: the feature layer).
        drop_newlines: drop LLaVA-NeXT row-newline tokens as the official code does.
        score: ``"attention"`` (default: the CLS attention, or the received-attention substitute
            on towers without CLS) or ``"wpr"`` (weighted PageRank; towers without CLS only).
        recycle: ``"none"`` (default), ``"nearest"`` (fold each dropped token into its most
            similar kept token, mean of the group) or ``"clusters"`` (a tenth of the budget goes
            to DPC-kNN cluster means of the dropped tokens, at their centres; ``vtprune.recycling``).

    Example:
        >>> HiRED(budget=0.2).alpha
        0.5
    """

    budget: float | None = None
    alpha: float = 0.5
    split_layer: int = 0
    select_layer: int | None = None
    drop_newlines: bool = False
    recycle: str = "none"
    score: str = "attention"

    @classmethod
    def tune_space(cls, info: ModelInfo, keep: float) -> dict[str, list]:
        """The share of the budget spent on the base image (``alpha``) and the scoring layer for
        ``vtprune.tune``."""
        depth = info.vision_layers or 1
        layers = sorted({-1, -2, -(depth // 2 or 1)} & set(range(-depth, 0)))
        return {"alpha": [0.3, 0.5, 0.7, 1.0], "select_layer": [None, *layers]}

    def validate(self) -> None:
        check_fraction(self.name, "alpha", self.alpha, allow_zero=True)
        check_choice(self.name, "score", self.score, TOWER_SCORES)
        # tower layers: the type here, the range (negative counts from the end) against the tower
        check_int(self.name, "split_layer", self.split_layer)
        if self.select_layer is not None:
            check_int(self.name, "select_layer", self.select_layer)
        check_bool(self.name, "drop_newlines", self.drop_newlines)
        check_recycle(self.name, self.recycle)
        if self.budget is not None:
            check_fraction(self.name, "budget", self.budget)
            if self.keep is not None:
                raise ValueError("hired: give either 'keep' or 'budget', not both")

    def stages(self, info: ModelInfo) -> list:
        check_vision_layer(self.name, "split_layer", self.split_layer, info)
        check_vision_layer(self.name, "select_layer", self.select_layer, info)
        budget = 0.2 if self.budget is None and self.keep is None else self.budget
        return [HiREDStage(self, budget)]


def crop_shares(base_scores: torch.Tensor, side: int, grid: tuple[int, int], top_n: int) -> list[int]:
    """How many of the base image's ``top_n`` tokens fall in each crop's region (row-major crops).

    Crop ``(i, j)`` of a ``rows x cols`` grid covers base-grid rows ``[i*side/rows, (i+1)*side/rows)``
    and columns ``[j*side/cols, (j+1)*side/cols)``.

    Example:
        >>> s = torch.zeros(16); s[[0, 1, 4, 15]] = 1  # 3 top tokens top-left, 1 bottom-right
        >>> crop_shares(s, 4, (2, 2), 4)
        [3, 0, 0, 1]
    """
    rows, cols = grid
    top = base_scores.topk(min(top_n, base_scores.numel())).indices
    r, c = top // side, top % side
    crop = (r * rows // side) * cols + (c * cols // side)
    return torch.bincount(crop, minlength=rows * cols).tolist()


class HiREDStage(VisionStage):
    key = "hired"

    def __init__(self, cfg: HiRED, budget: float | None):
        self.cfg, self.fraction = cfg, budget
        self.keep = cfg.keep
        self.recycle = cfg.recycle
        self.tower_score = cfg.score

    def select_layer(self, default: int) -> int:
        """The scoring layer: ``select_layer`` if set, else ``default`` (the feature layer's score
        block: on Qwen2.5-VL the last full-attention block at or before it)."""
        return default if self.cfg.select_layer is None else self.cfg.select_layer

    def vision_layers(self, adapter) -> list[int]:
        default = adapter.score_block(adapter.vision_feature_layer())
        return sorted({self.cfg.split_layer, self.select_layer(default)})

    def expected_count(self, n_image: int) -> int:
        return int(n_image * (self.cfg.keep if self.cfg.keep is not None else self.fraction) + 0.5)

    def budget(self, view: ImageView) -> int:
        """Patch tokens to choose: ``round(keep * tokens)`` less the kept newlines, or
        ``int(partitions * N * budget)`` (the official rule, newlines on top; a video's frames
        count as its partitions: one budget over the clip)."""
        if self.cfg.keep is not None:
            fixed = 0 if self.cfg.drop_newlines else view.num_newlines
            return max(0, int(self.cfg.keep * view.num_tokens + 0.5) - fixed)
        return int(max(view.crops, view.frames) * view.segments[0].size * self.fraction)

    def pick(self, view: ImageView, budget: int) -> torch.Tensor:
        sel = view.cls_scores(self.select_layer(view.score_layer), self.tower_score)
        newlines = view.newline_indices
        fixed = newlines if not self.cfg.drop_newlines else newlines[:0]
        n_part = view.segments[0].size  # N: patch tokens of one partition
        if view.crops == 1 or len(view.segments) == 1 or view.kind == "video":  # frames: no base image
            chosen = _top(sel, view.patch_indices, budget)
            return torch.cat([fixed, chosen]).sort().values
        base_idx = view.segments[0].indices().to(sel.device)
        base_k = min(int(budget * self.cfg.alpha), n_part)
        chosen = [_top(sel, base_idx, base_k)]
        split = view.cls_scores(self.cfg.split_layer, self.tower_score)
        side = view.extra["crop_side"]
        grid = view.extra["crop_grid"]
        # one host read per multi-crop image: the crops' shares feed a largest-remainder split
        shares = crop_shares(split[base_idx], side, grid, int(n_part * (1 - self.cfg.alpha)))
        crop_of = view.layout.source // view.tower_tokens_per_crop  # host tensors: no device sync
        crop_of = crop_of.masked_fill(view.layout.source < 0, -1)
        members = [torch.nonzero(crop_of == j + 1).flatten() for j in range(len(shares))]
        budgets = allocate(budget - base_k, shares, [m.numel() for m in members])
        chosen += [_top(sel, m.to(sel.device), k) for m, k in zip(members, budgets)]
        return torch.cat([fixed, *chosen]).sort().values


def _top(scores: torch.Tensor, candidates: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 0 or candidates.numel() == 0:
        return candidates[:0]
    order = torch.sort(scores[candidates], descending=True, stable=True).indices[:k]
    return candidates[order]
