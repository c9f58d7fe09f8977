"""Temporal: drop video tokens that repeat the same grid cell of the previous frame.

The idea of Efficient Video Sampling (EVS; Bagrov et al., 2025), as vLLM runs it for Qwen2.5-VL
/ Qwen3-VL (``vllm/multimodal/video_prune/evs.py``): a token whose projector output is nearly
the same as the token at the same grid cell of the previous frame adds little, so static regions
of a clip collapse onto their first appearance while moving regions stay. Attention-free: it
reads only the projector outputs, so SDPA / FlashAttention stay on and no tower scores are
captured.

Per video of ``F`` frames of ``T`` tokens each (Qwen: a frame is one temporal patch, a 2-frame
tubelet, laid out in raster order), every token gets a dissimilarity ``1 - cos(x[f, c],
x[f - 1, c])`` to the same cell ``c`` of the previous frame; the first frame's tokens rank above
every other token. The ``round(keep * F * T)`` highest-ranked tokens stay (ties, including among
the first frame's, go to the earlier token), computed for the whole clip at once with one stable
sort, so there is no host sync per frame.

Choices and deviations (none of them changes which later-frame token outranks which):

* LLaVA-OneVision closes a clip with one newline token after its frames: it is not a grid cell,
  so it is ranked first (kept while the budget exceeds one frame, as the image methods keep
  newlines) and the frames are ranked as above.

* ``keep`` is resolved exactly: ``round(keep * tokens)`` per video. vLLM instead keeps
  ``max(T, int(keep * F * T))``, i.e. never less than the first frame. Here, when the budget is
  below one frame (``keep < 1 / F``), the budget is spent on the first frame alone, on the evenly
  strided lattice of the ``uniform`` baseline rather than on its top-left tokens.
* Images (one frame) carry no temporal signal: they fall back to that same rule, the
  ``uniform`` baseline (strided lattice per grid, LLaVA-NeXT row newlines kept and counted).
  ``keep=1.0`` therefore keeps everything, images and videos alike.
* The previous frame, not the previous *kept* token of the cell, is the reference (as in vLLM):
  comparing with the last kept token would make each frame's ranking depend on the choices
  made for the frames before it, so ``keep`` could not be met by one sort.
* Cosine similarity in float32 on the language model's input embeddings (vLLM: the model dtype,
  on the same tensors).
* Frames must share one grid (true of every Qwen video); a video whose frames differ is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vtprune.config import MethodConfig, ModelInfo, register_method
from vtprune.images import ImageView
from vtprune.methods.baselines import ImageBudgetStage
from vtprune.stages import VisionStage

DEFAULT_KEEP = 0.25  # vLLM's EVS has no default rate (0 = off); a quarter is a common operating point


@register_method("temporal")
@dataclass
class Temporal(MethodConfig):
    """Temporal redundancy pruning (the EVS rule): per video, keep the ``round(keep * tokens)``
    tokens least similar to the same grid cell of the previous frame (the first frame first).
    Images fall back to the ``uniform`` baseline's strided lattice.

    Args:
        keep: kept fraction of each video's (and image's) tokens (default 0.25).

    Example:
        >>> Temporal(keep=0.3).keep
        0.3
    """

    def stages(self, info: ModelInfo) -> list:
        return [TemporalStage(DEFAULT_KEEP if self.keep is None else self.keep)]


def temporal_order(feats: torch.Tensor, frames: int) -> torch.Tensor:
    """Token indices of a clip ``[frames * T, D]`` (frame after frame, one grid each) from most
    to least worth keeping: the first frame's tokens in order, then the later frames' tokens by
    falling dissimilarity to the same cell of the previous frame (ties: the earlier token).

    Example:
        >>> x = torch.tensor([[1.0, 0], [0, 1], [1, 0], [1, 0], [0, 1], [1, 0]])  # 3 frames of 2 cells
        >>> temporal_order(x, 3).tolist()  # cell 1 changes at frame 1, cell 0 at frame 2
        [0, 1, 3, 4, 2, 5]
    """
    n, dim = feats.shape
    x = feats.float().reshape(frames, n // frames, dim)
    dissimilar = 1 - torch.nn.functional.cosine_similarity(x[1:], x[:-1], dim=-1)  # [F-1, T]
    # cosine distance is at most 2: 3 puts the first frame above every later token
    first = torch.full_like(x[0, :, 0], 3.0)
    scores = torch.cat([first.unsqueeze(0), dissimilar]).flatten()
    return torch.sort(scores, descending=True, stable=True).indices


class TemporalStage(VisionStage):
    key = "temporal"

    def __init__(self, keep: float):
        self.keep = keep
        self.fallback = ImageBudgetStage("uniform", keep, protect_newlines=True)

    def expected_count(self, n_image: int) -> int:
        return int(n_image * self.keep + 0.5)

    def pick(self, view: ImageView, budget: int) -> torch.Tensor:
        frames = view.frames
        if frames == 1:
            return self.fallback.pick(view, budget)
        segs = view.segments
        size = segs[0].size
        grid = frames * size
        # LLaVA-OneVision ends a clip with one newline token after its frames: not a grid cell
        tail_is_newlines = bool(view.newline[grid:].all()) if view.num_tokens > grid else True
        if (
            any(s.size != size or s.offset != f * size or s.row_stride != s.cols for f, s in enumerate(segs))
            or view.num_tokens < grid
            or not tail_is_newlines
        ):
            raise ValueError(
                "temporal: a video whose frames are not one shared, contiguous grid is not supported "
                f"(frame sizes {[s.size for s in segs]}, {view.num_tokens} tokens)"
            )
        if budget <= size:  # below one frame: the first frame's lattice (see the module notes)
            return self.fallback.pick(view.frame_views()[0], budget)
        # the clip's closing newlines stay first, as the image methods keep newlines
        tail = torch.arange(grid, view.num_tokens, device=view.features.device)
        order = torch.cat([tail, temporal_order(view.features[:grid], frames)])
        return order[:budget].sort().values
