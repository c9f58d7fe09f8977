"""VScan: local and global scans of the vision tower, merging, then one prune inside the LLM.

Zhang et al., "VScan: Rethinking Visual Token Reduction for Efficient Large Vision-Language
Models" (TMLR 2026; official code: github.com/Tencent/SelfEvolvingAgent, ``VScan/``). Two stages:

1. Vision stage, per partition (the image; LLaVA-NeXT: the base image and each crop):
   ``T`` tokens are kept, ``int(T * local_share)`` of them by a **local scan** and the rest by a
   **global scan**, and every other token is **merged** into its most similar kept token.

   * Local scan: the tower's CLS attention (head mean; towers without CLS: the substitute score
     below) at a shallow layer, ``local_layer``. The partition's grid is cut into
     ``window x window`` blocks (the last block of a row or column takes the remainder); in
     descending score order a token is taken while its block holds fewer than ``cap`` picks,
     until the local count is reached (:func:`window_topk`).
   * Global scan: the same score at ``global_layer`` (the feature layer); the highest-scoring
     tokens not picked by the local scan fill the rest.
   * Merge: each unselected token goes to the kept token of its partition with the largest
     cosine similarity of the projector outputs (the language model's inputs), and each kept
     token becomes ``(x + sum of its tokens) / (1 + count)`` (``vtprune.recycling.recycle_nearest``).
     Kept tokens keep their positions (M-RoPE included).

2. Prefill stage: before decoder layer ``layer`` (default: half the depth, the official 16 of 32
   and 14 of 28) the visual tokens the last instruction token attends to least leave. The score
   is PyramidDrop's, reused (``PyramidDropStage.scores``): layer ``layer``'s own norm and q/k
   projections on layer ``layer - 1``'s output, one query row recomputed beside SDPA /
   FlashAttention, mean over heads; with ``labels``, the tokens before each answer span.

Why a vision stage (reading CLS rows at two tower layers) and not a tower stage: VScan's scans
only *read* the tower, which runs in full in the official code (its tokens are chosen after the
last layer), and its merge is formed on the projector outputs. So the tower has nothing to drop
early; the vision-stage probe hooks the q/k projections of the two layers and recomputes the one
CLS row per crop beside SDPA (Qwen: the received attention of the chosen blocks), with no eager
switch. Head sum (ours) and head mean (the LLaVA code) rank the same.

Substitute scores and defaults per family:

* LLaVA-1.5 / LLaVA-NeXT (CLIP with CLS): the CLS row at tower layer 5 (local) and the feature
  layer, ``-2`` (global), as the official code; ``window=6`` on each crop's 24 x 24 tower grid.
  ``local_layer`` defaults to ``round(5 * depth / 24)`` on other depths.
* Qwen2-VL, Qwen2.5-VL, Qwen3-VL (no CLS): the attention each patch *receives* from all
  patches of its image (head mean, query mean), averaged over the 2 x 2 patches merged into one
  token (``ImageView.cls_scores``); windows of ``window=4`` tokens on the merged grid, as the
  official Qwen2.5-VL port. Qwen2.5-VL reads full-attention blocks by default: the local layer
  moves to the last full-attention block at or before ``round(5 * depth / 24)`` (the first one
  when none is: block 7 of 32, the official choice) and the global one is the last block; the
  window-permuted patch order is mapped back to tokens by the probe
  (``vtprune.runtime.vision``). Qwen2-VL and Qwen3-VL have full attention in every block.
* LLaVA-OneVision (SigLIP, no CLS): the received-attention substitute per crop; windows of 6 on
  each crop's tower grid.

Budget (``keep``): the layer average over the decoder of the visual tokens each layer sees,
relative to the prompt's visual tokens, as VScan's own accounting ("64 tokens on average" is 96
after the tower for 16 layers and 32 for the other 16). With ``L`` layers and the prefill stage
at ``K``, the vision stage keeps ``v = keep * L / (K + split * (L - K))`` of each image
(``selection.two_stage_fractions``; the defaults ``keep=0.111``, ``split=1/3`` give 96 of 576
and Qwen2.5-VL's 16.7%); the prefill stage then solves its count per row in closed form so
that the average lands on ``keep`` (``selection.two_stage_count``), absorbing the vision stage's
rounding.

Deviations from the official code (each also in the README's method notes):

* The local scan is the official Qwen2.5-VL rule (a per-window cap ``ceil(n_local / windows)``
  over the globally sorted scores) on every family, generalised to grids of any size (at least
  one window per side). On LLaVA's 24 x 24 grid it equals the official LLaVA rule (top
  ``n_local / 16`` of every 6 x 6 window) whenever ``n_local`` is a multiple of 16; otherwise the
  official LLaVA rule keeps ``16 * floor(n_local / 16)`` local tokens and its total falls short of
  ``T``, while ours spends ``T`` exactly. When windows hold too few candidates (LLaVA-NeXT crops
  cut by unpadding) the cap rises until the local count is reached.
* LLaVA-NeXT: a crop's candidates are its tokens that survive unpadding (the official code picks
  over the whole crop and loses the picks in the padding); the image's budget is
  ``round(v * tokens)`` with the (kept) newline tokens counted in it, split over the base image
  and crops by their sizes (the official code gives every crop the same ``T``).
* Prefill count: closed form on the layer average instead of a fixed ``image_token_list`` count
  or ratio, so ``keep`` holds per row whatever the vision stage rounded.
* Qwen2-VL, Qwen3-VL, LLaVA-OneVision and videos have no official port; the scores are the
  documented substitutes above. A video is one partition, its windows cut per frame
  (``video_budget="frame"`` prunes each frame alone).
* ``merge=False`` drops the unselected tokens instead (the official code's commented-out option).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vtprune.config import (
    ModelInfo,
    VideoBudget,
    check_bool,
    check_fraction,
    check_int,
    check_vision_layer,
    register_method,
)
from vtprune.images import ImageView
from vtprune.methods.pdrop import PyramidDropStage
from vtprune.recycling import recycle_nearest
from vtprune.selection import split_budget, two_stage_count, two_stage_plan
from vtprune.stages import Pick, PrefillContext, VisionStage

DEFAULT_KEEP = 0.111  # 64 of LLaVA-1.5's 576 tokens on average, the paper's headline budget
DEFAULT_SPLIT = 1 / 3  # 96 -> 32 (LLaVA), 16.7% -> 33.3% of it (Qwen2.5-VL)
LOCAL_LAYER, REFERENCE_DEPTH = 5, 24  # CLIP ViT-L layer 5 of 24
QWEN_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


@register_method("vscan")
@dataclass
class VScan(VideoBudget):
    """VScan (Zhang et al., TMLR 2026): local + global CLS scans and merging, then a middle-layer prune.

    Args:
        keep: layer-average fraction of visual tokens over both stages (default 0.111).
        layer: decoder layer from which the prefill stage's tokens are gone (default: half the depth).
        split: share of the vision stage's tokens the prefill stage keeps (default 1/3).
        local_layer: tower layer of the local scan (default ``round(5 * depth / 24)``; Qwen2.5-VL:
            a full-attention block).
        global_layer: tower layer of the global scan (default: the feature layer's score block).
        window: side of the local scan's windows in tokens (default 6; Qwen families 4).
        local_share: share of a partition's tokens chosen by the local scan (default 0.5).
        merge: merge each unselected token into its most similar kept token (default ``True``).

    Example:
        >>> layer, vision, split = VScan().resolve(ModelInfo(num_layers=32, family="llava"))
        >>> layer, round(vision * 576), round(split * vision * 576)  # 96 after the tower, 32 from 16
        (16, 96, 32)
    """

    layer: int | None = None
    split: float = DEFAULT_SPLIT
    local_layer: int | None = None
    global_layer: int | None = None
    window: int | None = None
    local_share: float = 0.5
    merge: bool = True

    @classmethod
    def tune_space(cls, info: ModelInfo, keep: float) -> dict[str, list]:
        """The prefill stage's layer and share and the local scan's share for ``vtprune.tune``."""
        n = info.num_layers
        layers = sorted({max(1, round(n * f)) for f in (0.25, 0.5, 0.75)})
        return {"layer": layers, "split": [0.2, 1 / 3, 0.5], "local_share": [0.25, 0.5, 0.75]}

    def validate(self) -> None:
        # layers: the type here, the range against the model (decoder depth, tower depth) at resolve
        for name in ("layer", "local_layer", "global_layer"):
            if getattr(self, name) is not None:
                check_int(self.name, name, getattr(self, name))
        check_fraction(self.name, "split", self.split, allow_zero=True)
        if self.window is not None:
            check_int(self.name, "window", self.window, minimum=1)
        check_fraction(self.name, "local_share", self.local_share, allow_zero=True)
        check_bool(self.name, "merge", self.merge)

    def resolve(self, info: ModelInfo) -> tuple[int, float, float]:
        """``(layer, vision fraction, split)``: where the prefill stage acts, what the vision stage
        keeps of each image, and the share of it the prefill stage keeps."""
        keep = DEFAULT_KEEP if self.keep is None else self.keep
        return two_stage_plan(self.name, keep, self.layer, self.split, info.num_layers)

    def stages(self, info: ModelInfo) -> list:
        check_vision_layer(self.name, "local_layer", self.local_layer, info)
        check_vision_layer(self.name, "global_layer", self.global_layer, info)
        layer, vision, split = self.resolve(info)
        keep = DEFAULT_KEEP if self.keep is None else self.keep
        window = self.window or (4 if info.family in QWEN_FAMILIES else 6)
        scan = VScanVisionStage(
            vision, window, self.local_share, self.merge, self.local_layer, self.global_layer
        )
        return [scan, VScanPrefillStage(layer, keep, info.num_layers, split)]


def window_topk(scores: torch.Tensor, windows: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of ``k`` tokens picked window by window: in descending ``scores`` order (ties: the
    earlier token), a token is taken while its window (``windows[i]``, any integer id) holds fewer
    than ``cap`` picks; ``cap`` is the smallest value, from ``ceil(k / windows)``, that reaches
    ``k`` (it only grows past that when some windows hold too few tokens). Returned sorted.

    Example:
        >>> s = torch.tensor([9.0, 8, 7, 1, 2, 3])  # window 0: tokens 0-2, window 1: tokens 3-5
        >>> window_topk(s, torch.tensor([0, 0, 0, 1, 1, 1]), 4).tolist()
        [0, 1, 4, 5]
        >>> window_topk(s, torch.tensor([0, 0, 0, 0, 0, 1]), 4).tolist()  # window 1 has one token
        [0, 1, 2, 5]
    """
    k = min(k, scores.numel())
    if k <= 0:
        return torch.zeros(0, dtype=torch.long, device=scores.device)
    order = torch.sort(scores.float(), descending=True, stable=True).indices
    _, win = torch.unique(windows.to(order.device)[order], return_inverse=True)
    sizes = torch.bincount(win)
    # each token's rank inside its window, in score order
    grouped = torch.sort(win, stable=True).indices
    starts = torch.cumsum(sizes, 0) - sizes
    rank = torch.empty_like(win)
    rank[grouped] = torch.arange(win.numel(), device=win.device) - starts[win[grouped]]
    cap = -(-k // sizes.numel())
    while int(sizes.clamp(max=cap).sum()) < k:  # one host read per step; windows too small
        cap += 1
    return order[rank < cap][:k].sort().values


def token_windows(view: ImageView, window: int) -> torch.Tensor:
    """``[n]`` window id of each of the image's tokens (-1 for newlines).

    Towers run per crop (LLaVA, LLaVA-NeXT, LLaVA-OneVision): the crop's square tower grid, where
    the token's tower patch lies (downscaled tokens: their heaviest tap). Otherwise (Qwen) each
    grid segment (an image, or one frame of a video) on its token grid. ``window x window``
    blocks; a grid side shorter than two windows is one block wide, and the last block of a side
    takes the remainder (the official Qwen2.5-VL rule).

    Example:
        >>> from vtprune.images import GridSegment, ImageLayout
        >>> lay = ImageLayout(0, torch.arange(12), [GridSegment(0, 3, 4, 4)], torch.zeros(12, dtype=torch.bool))
        >>> token_windows(ImageView(lay, embeds=torch.zeros(12, 1)), 2).view(3, 4).tolist()
        [[0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 1, 1]]
    """
    n = view.num_tokens
    src, per = view.source, view.tower_tokens_per_crop
    if src is not None and per is not None:
        lead = 1 if view.has_cls else 0
        side = math.isqrt(per - lead)
        blocks = max(1, side // window)
        patch = (src % per - lead).clamp(min=0)
        r = (patch // side // window).clamp(max=blocks - 1)
        c = (patch % side // window).clamp(max=blocks - 1)
        ids = ((src // per) * blocks + r) * blocks + c
        return torch.where(src >= 0, ids, -1).to(view.device)
    ids = torch.full((n,), -1, dtype=torch.long)
    base = 0
    for seg in view.segments:
        bh, bw = max(1, seg.rows // window), max(1, seg.cols // window)
        r = (torch.arange(seg.rows) // window).clamp(max=bh - 1)
        c = (torch.arange(seg.cols) // window).clamp(max=bw - 1)
        ids[seg.indices()] = base + (r.unsqueeze(1) * bw + c.unsqueeze(0)).flatten()
        base += bh * bw
    return ids.to(view.device)


class VScanVisionStage(VisionStage):
    key = "vscan-vision"

    def __init__(
        self,
        fraction: float,
        window: int,
        local_share: float = 0.5,
        merge: bool = True,
        local_layer: int | None = None,
        global_layer: int | None = None,
    ):
        self.fraction, self.window, self.local_share, self.merge = fraction, window, local_share, merge
        self.local_layer, self.global_layer = local_layer, global_layer

    def scan_layers(self, depth: int, default_block, feature_layer: int) -> tuple[int, int]:
        """``(local, global)`` tower layers: the options (as given, negative from the end), or the
        defaults moved to the family's score block (Qwen2.5-VL: a full-attention block).

        Example:
            >>> VScanVisionStage(0.2, 6).scan_layers(24, lambda layer: layer, 22)
            (5, 22)
        """
        local = self.local_layer
        local = (
            default_block(int(LOCAL_LAYER * depth / REFERENCE_DEPTH + 0.5))
            if local is None
            else local % depth
        )
        glob = default_block(feature_layer) if self.global_layer is None else self.global_layer % depth
        return local, glob

    def vision_layers(self, adapter) -> list[int]:
        depth = adapter.vision_layers_count
        return sorted(set(self.scan_layers(depth, adapter.score_block, adapter.vision_feature_layer())))

    def expected_count(self, n_image: int) -> int:
        return int(n_image * self.fraction + 0.5)

    def budget(self, view: ImageView) -> list[int]:
        """Tokens each partition keeps: ``round(fraction * tokens)`` for the image, less its fixed
        tokens (newlines, CLS placeholders), split over the partitions by size."""
        parts = view.partitions()
        fixed = view.num_newlines + sum(cls.numel() for _, cls in parts)
        total = max(0, int(self.fraction * view.num_tokens + 0.5) - fixed)
        return split_budget(total, [p.numel() for p, _ in parts])

    def pick(self, view: ImageView, budget: list[int]) -> Pick:
        local_layer, global_layer = self.scan_layers(
            view.tower_layers, view.default_block, view.feature_layer
        )
        shallow, deep = view.cls_scores(local_layer), view.cls_scores(global_layer)
        windows = token_windows(view, self.window)
        kept, merges = [view.newline_indices], []
        for (patches, cls), k in zip(view.partitions(), budget):
            kept.append(cls)
            if k >= patches.numel():
                kept.append(patches)
                continue
            local = window_topk(shallow[patches], windows[patches], int(k * self.local_share))
            rest = torch.ones(patches.numel(), dtype=torch.bool, device=patches.device)
            rest[local] = False
            others = torch.nonzero(rest).flatten()
            order = torch.sort(deep[patches][others].float(), descending=True, stable=True).indices
            chosen = torch.cat([local, others[order[: k - local.numel()]]]).sort().values
            kept.append(patches[chosen])
            if self.merge and chosen.numel():
                merges.append((patches[chosen], recycle_nearest(view.features[patches], chosen)))
        return Pick(torch.cat(kept).sort().values, merges)


class VScanPrefillStage(PyramidDropStage):
    """PyramidDrop's scorer at ``layer``, with the count that makes the layer average ``keep``."""

    def __init__(self, layer: int, keep: float, num_layers: int, split: float):
        super().__init__(layer, split)
        self.keep, self.num_layers = keep, num_layers
        self.key = f"vscan@{layer}"

    def count(self, ctx: PrefillContext) -> torch.Tensor:
        n_prompt = ctx.visual_prompt if ctx.visual_prompt is not None else ctx.visual_in
        return two_stage_count(self.keep, n_prompt, ctx.visual_in, self.layer, self.num_layers)

    def expected_count(self, n_in: int, n_current: int) -> int:
        return min(n_current, int(n_in * self.fraction + 0.5))
