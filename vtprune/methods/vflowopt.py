"""VFlowOpt: keep the tokens the tower's hub tokens look at; recycle the rest by spatial cell.

Yang et al., "VFlowOpt: A Token Pruning Framework for LMMs with Visual Information Flow-Guided
Optimization" (ICCV 2025). A vision stage. At one tower layer (default: the feature layer's score
block) the head-mean attention map ``A`` of each crop (Qwen2-VL: each image) is formed beside the
tower's own attention (``vtprune.runtime.vision``, one crop's map at a time); a token's received
attention is its column mean, the *hub* tokens are those receiving more than ``threshold`` times
the mean, and a token's importance is its mean attention from the hubs
(``vtprune.scoring.hub_attention``). Each image keeps ``round(keep * tokens)`` tokens:

* ``cell=None`` (default, the official single-image path): the top tokens by importance.
* ``cell=m`` (the official anyres path's recycling): the image's grids (LLaVA-NeXT: base image
  and crops; Qwen2-VL: each frame) are cut into ``m x m`` cells; the top tokens are kept, the
  rest are grouped by cell, and each group becomes one token: the importance-weighted mean of the
  group's embeddings, written into the group's most important member, which is kept.

LLaVA-NeXT row-newline tokens are always kept (the official code scores them 1) and count towards
the budget. ``vtprune.tune(model, "vflowopt", ...)`` searches ``threshold``, ``cell`` and ``layer``
under ``keep``, VFlowOpt's own offline optimisation reduced to a seeded search.

Deviations from the official code (LLaVA-OneVision only):

* **Patch entropy is not implemented** (the official ``alpha_v`` term, a grey-level histogram
  entropy of each 14x14 pixel patch): the shipped 10% configuration sets ``alpha_v=0``, and the
  stage sees tower activations, not the raw pixels.
* **No LLM-side schedule.** The official method also drops tokens at decoder layers 9 and 18 by
  the carried ViT importance; here ``vflowopt`` is the vision stage only (``keep`` is the fraction
  that reaches the decoder). Compose it with a prefill method for in-LLM drops.
* **Recycled count.** The official code drops ``reduce + int(len / m**2)`` tokens and re-keeps one
  per non-empty cell, so the count drifts from the budget; here the number of kept top tokens is
  solved so that top tokens plus non-empty cells equal the budget exactly; a budget no larger
  than the number of cells falls back to plain top-k.
* The merge acts on the language-model input embeddings (projector outputs), and applies to
  every image, not only anyres ones. On CLIP towers the CLS token takes part in the map (as a
  query and as a possible hub); on Qwen2-VL a token's importance is the mean over its 2x2 patches.
* Default ``keep`` 0.1166: the shipped 10% configuration's vision ratio ``vit_r``; default
  ``threshold`` 39.26 is that configuration's ``t``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vtprune.config import ModelInfo, VideoBudget, _invalid, check_int, check_vision_layer, register_method
from vtprune.images import ImageView
from vtprune.stages import Pick, VisionStage

DEFAULT_KEEP = 0.1166  # the official 10% configuration's vit_r
DEFAULT_THRESHOLD = 39.26  # its hub threshold t


@register_method("vflowopt")
@dataclass
class VFlowOpt(VideoBudget):
    """VFlowOpt (Yang et al., 2025): hub-token attention in the tower, optional cell recycling.

    Args:
        keep: kept fraction of each image's tokens (default 0.1166, the official ``vit_r``).
        threshold: hub tokens receive more than ``threshold`` times the mean received attention
            (default 39.26, the official ``t``); a number > 0.
        cell: side of the recycling cells in tokens (a number >= 1), or ``None`` (default): plain
            top-k, no recycling.
        layer: tower layer whose attention map is read (default: the feature layer's score block).

    Example:
        >>> VFlowOpt(keep=0.25, cell=4).threshold
        39.26
    """

    threshold: float = DEFAULT_THRESHOLD
    cell: float | None = None
    layer: int | None = None

    def validate(self) -> None:
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0 or not math.isfinite(t):
            raise _invalid(self.name, "threshold", t, "a finite number > 0")
        c = self.cell
        if c is not None and (
            isinstance(c, bool) or not isinstance(c, (int, float)) or not 1 <= c < math.inf
        ):
            raise _invalid(self.name, "cell", c, "None or a finite number >= 1")
        if self.layer is not None:
            check_int(self.name, "layer", self.layer)  # the range: against the tower, at apply

    @classmethod
    def tune_space(cls, info: ModelInfo, keep: float) -> dict[str, list]:
        """Hub threshold, recycling cell and tower layer for ``vtprune.tune``."""
        depth = info.vision_layers or 1
        layers = sorted({-1, -2, -(depth // 2 or 1)} & set(range(-depth, 0)))
        return {
            "threshold": [1.0, 2.0, 5.0, 10.0, 20.0, DEFAULT_THRESHOLD],
            "cell": [None, 2, 3, 4, 6],
            "layer": [None, *layers],
        }

    def stages(self, info: ModelInfo) -> list:
        check_vision_layer(self.name, "layer", self.layer, info)
        keep = DEFAULT_KEEP if self.keep is None else self.keep
        return [VFlowOptStage(keep, float(self.threshold), self.cell, self.layer)]


def cell_groups(view: ImageView, members: torch.Tensor, cell: float) -> torch.Tensor:
    """``[len(members)]``: the cell id of each local token index (its grid and ``m x m`` cell),
    -1 for tokens outside every grid (LLaVA's "full" CLS placeholder).

    Example:
        >>> from vtprune.images import GridSegment, ImageLayout
        >>> lay = ImageLayout(0, torch.arange(16), [GridSegment(0, 4, 4, 4)], torch.zeros(16, dtype=torch.bool))
        >>> cell_groups(ImageView(lay), torch.tensor([0, 3, 5, 15]), 2).tolist()
        [0, 1, 0, 3]
    """
    ids = torch.full((view.num_tokens,), -1, dtype=torch.long)
    base = 0
    for seg in view.segments:
        per_row = math.ceil(seg.cols / cell)
        r = torch.arange(seg.rows).unsqueeze(1)
        c = torch.arange(seg.cols).unsqueeze(0)
        cid = (torch.floor(r / cell).long() * per_row + torch.floor(c / cell).long()).flatten()
        ids[seg.indices()] = base + cid
        base += math.ceil(seg.rows / cell) * per_row
    return ids[members.cpu()].to(members.device)


def recycle_cells(
    scores: torch.Tensor, feats: torch.Tensor, candidates: torch.Tensor, groups: torch.Tensor, budget: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep ``budget`` of ``candidates``: the top ones by ``scores`` plus one token per cell of
    the rest (``groups`` gives each candidate's cell, -1: none). Returns ``(kept, targets,
    vectors)``: the kept local indices and, per non-empty cell, its most important member and the
    importance-weighted mean of the cell's dropped tokens.

    Example:
        >>> s = torch.tensor([4.0, 3.0, 2.0, 1.0]); f = torch.eye(4)
        >>> kept, targets, vectors = recycle_cells(s, f, torch.arange(4), torch.tensor([0, 0, 1, 1]), 3)
        >>> kept.tolist(), targets.tolist(), [round(v, 4) for v in vectors[1].tolist()]
        ([0, 1, 2], [1, 2], [0.0, 0.0, 0.6667, 0.3333])
    """
    order = torch.sort(scores[candidates], descending=True, stable=True).indices
    ranked, ranked_groups = candidates[order], groups[order]
    n_groups = int(torch.unique(groups[groups >= 0]).numel())
    if n_groups >= budget:  # more cells than tokens to keep: plain top-k
        return ranked[:budget].sort().values, candidates[:0], feats[:0]
    top = budget - n_groups
    # more top tokens leave fewer cells with dropped members: grow the top until top + cells == budget
    while True:
        rest = ranked_groups[top:]
        cells = torch.unique(rest[rest >= 0])
        if top + cells.numel() >= budget or top >= ranked.numel():
            break
        top = budget - cells.numel()
    dropped, dropped_groups = ranked[top:], ranked_groups[top:]
    targets, vectors = [], []
    for g in cells.tolist():
        members = dropped[dropped_groups == g]  # in descending importance: the first is the target
        w = scores[members].float().clamp_min(0)
        w = w / w.sum() if float(w.sum()) > 0 else torch.full_like(w, 1 / w.numel())
        targets.append(members[0])
        vectors.append((w.unsqueeze(1) * feats[members].float()).sum(0))
    if not targets:
        return ranked[:top].sort().values, candidates[:0], feats[:0]
    targets_t = torch.stack(targets)
    kept = torch.cat([ranked[:top], targets_t]).sort().values
    return kept, targets_t, torch.stack(vectors).to(feats.dtype)


class VFlowOptStage(VisionStage):
    key = "vflowopt"

    def __init__(self, keep: float, threshold: float, cell: float | None, layer: int | None):
        self.keep, self.threshold, self.cell, self.layer = keep, threshold, cell, layer

    def _layer(self, adapter) -> int:
        return adapter.score_block(adapter.vision_feature_layer()) if self.layer is None else self.layer

    def vision_layers(self, adapter) -> list[int]:
        return [self._layer(adapter)]

    def vision_hub(self, adapter) -> dict[int, float]:
        return {self._layer(adapter): self.threshold}

    def expected_count(self, n_image: int) -> int:
        return int(n_image * self.keep + 0.5)

    def pick(self, view: ImageView, budget: int) -> torch.Tensor | Pick:
        layer = view.score_layer if self.layer is None else self.layer
        scores = view.hub_scores(layer)
        fixed = view.newline_indices  # always kept, counted in the budget
        patches = view.patch_indices
        k = max(0, budget - fixed.numel())
        if k >= patches.numel():  # nothing to drop: no merge either (keep=1 is the unpruned model)
            return torch.cat([fixed, patches]).sort().values
        if self.cell is None:
            order = torch.sort(scores[patches], descending=True, stable=True).indices[:k]
            return torch.cat([fixed, patches[order]]).sort().values
        groups = cell_groups(view, patches, self.cell)
        kept, targets, vectors = recycle_cells(scores, view.features, patches, groups, k)
        merges = [(targets, vectors)] if targets.numel() else []
        return Pick(torch.cat([fixed, kept]).sort().values, replace=merges)
