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

Our addition (EVS has no such option): ``min_per_frame`` (default 0, the rule above exactly). The
rule ranks the whole first frame first, so once the budget is about one frame (e.g. ``keep=0.25``
on a 4-tubelet clip) a mostly static clip keeps only its first frame. ``min_per_frame=m``
guarantees every frame ``floor(m * B / F)`` tokens, where ``B`` is the clip's frame budget
(``round(keep * tokens)`` less the clip's closing newline when it is kept) and ``B / F`` each
frame's fair share: a later frame's floor is its own most dissimilar tokens (the same score, ties
to the earlier token), the first frame's floor is part of its share below. The rest of the budget,
``B - F * floor(m * B / F)`` (under ``F`` tokens short of ``B - m * B``), then goes by the unchanged
global ranking over the tokens not yet taken, so the clip keeps exactly ``B`` and ``keep`` is met
as before. The first frame, ranked first, takes ``min(T, B - (F - 1) * floor)`` tokens; when that
is less than the whole frame it keeps the ``uniform`` lattice of that many, as the rule already
does below one frame (with ``m = 0`` this is the same pick). Images (one frame) are unaffected.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vtprune.config import MethodConfig, ModelInfo, check_fraction, register_method
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
        min_per_frame: our addition, not in EVS: the share (in ``[0, 1]``) of each frame's fair
            share of the clip budget (budget / frames) that every frame is guaranteed, taken by
            its own highest-ranked tokens; the rest goes by the global ranking. 0 (default): the
            EVS rule exactly; 1: every frame keeps at least ``floor(budget / frames)``.

    Example:
        >>> Temporal(keep=0.3).keep
        0.3
        >>> Temporal(keep=0.25, min_per_frame=0.5).min_per_frame  # every frame keeps half its share
        0.5
    """

    min_per_frame: float = 0.0

    @classmethod
    def tune_space(cls, info: ModelInfo, keep: float) -> dict[str, list]:
        """No floor (the EVS rule), half and all of each frame's fair share, for ``vtprune.tune``."""
        return {"min_per_frame": [0.0, 0.5, 1.0]}

    def validate(self) -> None:
        check_fraction(self.name, "min_per_frame", self.min_per_frame, allow_zero=True)

    def stages(self, info: ModelInfo) -> list:
        return [TemporalStage(DEFAULT_KEEP if self.keep is None else self.keep, self.min_per_frame)]


def frame_dissimilarity(feats: torch.Tensor, frames: int) -> torch.Tensor:
    """``[frames - 1, T]``: ``1 - cos`` of each later frame's token to the same cell of the frame
    before it, in float32, for a clip ``[frames * T, D]``.

    Example:
        >>> x = torch.tensor([[1.0, 0], [0, 1], [1, 0], [1, 0]])  # 2 frames of 2 cells
        >>> frame_dissimilarity(x, 2).tolist()  # cell 0 unchanged, cell 1 turned 90 degrees
        [[0.0, 1.0]]
    """
    n, dim = feats.shape
    x = feats.float().reshape(frames, n // frames, dim)
    return 1 - torch.nn.functional.cosine_similarity(x[1:], x[:-1], dim=-1)


def temporal_order(feats: torch.Tensor, frames: int) -> torch.Tensor:
    """Token indices of a clip ``[frames * T, D]`` (frame after frame, one grid each) from most
    to least worth keeping: the first frame's tokens in order, then the later frames' tokens by
    falling dissimilarity to the same cell of the previous frame (ties: the earlier token).

    Example:
        >>> x = torch.tensor([[1.0, 0], [0, 1], [1, 0], [1, 0], [0, 1], [1, 0]])  # 3 frames of 2 cells
        >>> temporal_order(x, 3).tolist()  # cell 1 changes at frame 1, cell 0 at frame 2
        [0, 1, 3, 4, 2, 5]
    """
    dissimilar = frame_dissimilarity(feats, frames)
    # cosine distance is at most 2: 3 puts the first frame above every later token
    first = torch.full_like(dissimilar[0], 3.0)
    scores = torch.cat([first.unsqueeze(0), dissimilar]).flatten()
    return torch.sort(scores, descending=True, stable=True).indices


class TemporalStage(VisionStage):
    key = "temporal"

    def __init__(self, keep: float, min_per_frame: float = 0.0):
        self.keep, self.min_per_frame = keep, min_per_frame
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
        tail = torch.arange(grid, view.num_tokens, device=view.features.device)
        keep_tail = budget > size  # the closing newline stays while the budget exceeds one frame
        frame_budget = budget - tail.numel() if keep_tail else budget
        # the guaranteed floor per frame, rounded down so the floors never exceed the budget (the
        # epsilon keeps e.g. 0.29 * 200 / 2, 28.999... in floats, from flooring one short)
        floor = min(size, int(self.min_per_frame * frame_budget / frames + 1e-9))
        if floor:
            kept = self._pick_with_floor(view, frame_budget, floor)
            return torch.cat([tail, kept] if keep_tail else [kept]).sort().values
        if budget <= size:  # below one frame: the first frame's lattice (see the module notes)
            return self.fallback.pick(view.frame_views()[0], budget)
        # the clip's closing newlines stay first, as the image methods keep newlines
        order = torch.cat([tail, temporal_order(view.features[:grid], frames)])
        return order[:budget].sort().values

    def _pick_with_floor(self, view: ImageView, budget: int, floor: int) -> torch.Tensor:
        """``budget`` grid tokens of the clip: ``floor`` per later frame by its own ranking, the
        first frame's share, then the rest of the later frames by the global ranking."""
        frames, size = view.frames, view.segments[0].size
        dissimilar = frame_dissimilarity(view.features[: frames * size], frames)  # [F-1, T]
        device = dissimilar.device
        own = torch.sort(dissimilar, dim=1, descending=True, stable=True).indices[:, :floor]
        taken = torch.zeros_like(dissimilar, dtype=torch.bool).scatter_(1, own, True).flatten()
        # the first frame outranks every later token: after the floors it takes what is left of
        # the budget, up to the whole frame
        n_first = min(size, budget - (frames - 1) * floor)
        rest = budget - n_first - (frames - 1) * floor
        order = torch.sort(dissimilar.flatten(), descending=True, stable=True).indices
        later = torch.cat([torch.nonzero(taken).flatten(), order[~taken[order]][:rest]]) + size
        if n_first == size:
            first = torch.arange(size, device=device)
        else:  # part of the first frame: its lattice, as below one frame
            first = self.fallback.pick(view.frame_views()[0], n_first).to(device)
        return torch.cat([first, later])
