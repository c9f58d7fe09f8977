"""DivPrune: keep the most diverse set of an image's visual tokens (max-min diversity).

Alvar et al., "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models"
(CVPR 2025). Attention-free: it reads only the projector outputs (the language model's input
embeddings of the image), so SDPA / FlashAttention stay on and no tower scores are captured.

Per image, ``round(keep * tokens)`` tokens are chosen by greedy max-min diversity on cosine
distance (``vtprune.diversity.max_min_diversity``): first the token whose nearest neighbour is
farthest, then repeatedly the token farthest from everything chosen so far.

* LLaVA-NeXT: one selection over the image's whole token sequence (base image, unpadded crops
  and row-newline tokens alike), as the official code does. ``per_crop=True`` instead keeps the
  newline tokens (they count towards the budget) and splits the rest of the budget over the
  base image and the crops by size (largest remainders), selecting within each.
* Qwen2-VL: the tokens are the merger's outputs (one per 2x2 patches); kept tokens keep their
  3-D M-RoPE positions (the runtime gathers them), as the LightCompress / MMTok ports do.
* Official default ``SUBSET_RATIO = 0.098``: the default ``keep`` here.
* Distances are computed in float32 (the official code uses the model's dtype).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vtprune.config import ModelInfo, VideoBudget, check_bool, register_method
from vtprune.diversity import max_min_diversity
from vtprune.images import ImageView
from vtprune.recycling import check_recycle
from vtprune.selection import split_budget
from vtprune.stages import VisionStage

DEFAULT_KEEP = 0.098  # the official SUBSET_RATIO


@register_method("divprune")
@dataclass
class DivPrune(VideoBudget):
    """DivPrune (Alvar et al., 2025): max-min diversity of the projector outputs, per image.

    Args:
        keep: kept fraction of each image's tokens (default 0.098, the official ratio).
        per_crop: LLaVA-NeXT only: select within the base image and each crop (budget split by
            size, newline tokens kept) instead of over the whole image sequence.
        recycle: ``"none"`` (default), ``"nearest"`` (fold each dropped token into its most
            similar kept token, mean of the group) or ``"clusters"`` (a tenth of the budget goes
            to DPC-kNN cluster means of the dropped tokens, at their centres; ``vtprune.recycling``).

    Example:
        >>> DivPrune(keep=0.25, per_crop=True).per_crop
        True
    """

    per_crop: bool = False
    recycle: str = "none"

    @classmethod
    def tune_space(cls, info: ModelInfo, keep: float) -> dict[str, list]:
        """Per-crop selection and recycling of the dropped tokens for ``vtprune.tune``."""
        return {"per_crop": [False, True], "recycle": ["none", "nearest", "clusters"]}

    def validate(self) -> None:
        check_bool(self.name, "per_crop", self.per_crop)
        check_recycle(self.name, self.recycle)

    def stages(self, info: ModelInfo) -> list:
        stage = DivPruneStage(DEFAULT_KEEP if self.keep is None else self.keep, self.per_crop)
        stage.recycle = self.recycle
        return [stage]


class DivPruneStage(VisionStage):
    key = "divprune"

    def __init__(self, keep: float, per_crop: bool = False):
        self.keep, self.per_crop = keep, per_crop

    def expected_count(self, n_image: int) -> int:
        return int(n_image * self.keep + 0.5)

    def pick(self, view: ImageView, budget: int) -> torch.Tensor:
        feats = view.features
        parts = view.partitions()
        if not self.per_crop or len(parts) == 1:
            return max_min_diversity(feats, budget)
        fixed = view.newline_indices
        members = [torch.cat([p, c]).sort().values for p, c in parts]
        shares = split_budget(max(0, budget - fixed.numel()), [m.numel() for m in members])
        chosen = [m[max_min_diversity(feats[m], k)] for m, k in zip(members, shares)]
        return torch.cat([fixed, *chosen]).sort().values
