"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``): SigLIP tower, anyres tiles, video.

Images: HF packs ``[base tokens][for each row of the unpadded tile grid: row tokens + 1
image_newline]`` like LLaVA-NeXT, but when the unpadded grid holds more than
``anyres_max_N`` crops' worth of tokens (ratio > 1.1) it is bilinearly downscaled first, so a
token may mix up to four tower tokens. An image of a multi-image prompt (``batch_num_images``
> 1) is its base crop plus one newline. Videos: each frame's grid is bilinearly pooled to
``ceil(side / 2)`` squared tokens, frames follow one another and **one** newline ends the clip.

The SigLIP tower has no CLS token: vision-stage scores are the documented substitute, the
attention each patch receives from all patches of its crop (or frame) at the chosen layer
(``vtprune.runtime.vision.CropReceivedProbe``). A resampled token's score (and key, and tower
feature) is the same bilinear mix of its tower tokens' values as its feature is
(``ImageSpec.taps``); its crop is that of its heaviest tap. Positions are plain 1-D.

Partitions are the tower inputs: base image and tiles of an image, frames of a video. With one
budget over the clip, methods that split a budget over partitions (VisionZip) split it over the
frames by size; HiRED treats a video as one partition set scored frame by frame.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F
from transformers.models.llava_onevision import modeling_llava_onevision as hf_ov

from .base import Adapter, GridSegment, ImageSpec
from .llava import LlavaAdapter


def resample_taps(size_in: int, size_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The two taps per output index of 1-D bilinear resampling (``align_corners=False``), read
    off ``F.interpolate`` itself so they are the weights the model uses.

    Example:
        >>> idx, w = resample_taps(4, 2)
        >>> idx.tolist(), w.tolist()
        ([[0, 1], [2, 3]], [[0.5, 0.5], [0.5, 0.5]])
    """
    eye = torch.eye(size_in, dtype=torch.float64).view(1, size_in, size_in, 1)
    weights = F.interpolate(eye, size=(size_out, 1), mode="bilinear")[0, :, :, 0].T  # [out, in]
    w, idx = weights.topk(min(2, size_in), dim=1)
    order = idx.argsort(1)
    return idx.gather(1, order), w.gather(1, order).float()


def grid_taps(cells: torch.Tensor, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Taps ``([rows * cols, 4] index, weight)`` of bilinearly resizing a map of tower-token ids
    ``cells`` ``[H, W]`` to ``rows x cols`` (row-major)."""
    ri, rw = resample_taps(cells.shape[0], rows)
    ci, cw = resample_taps(cells.shape[1], cols)
    idx = cells[ri[:, None, :, None], ci[None, :, None, :]]  # [rows, cols, 2, 2]
    w = rw[:, None, :, None] * cw[None, :, None, :]
    return idx.reshape(rows * cols, -1), w.reshape(rows * cols, -1)


def _spec(taps_idx, taps_w, newline_at, segments, *, crops, extra=(), kind="image", frames=1) -> ImageSpec:
    """An ImageSpec from per-patch taps; newline tokens are inserted before indices ``newline_at``."""
    n = taps_idx.shape[0] + len(newline_at)
    is_newline = torch.zeros(n, dtype=torch.bool)
    is_newline[list(newline_at)] = True
    index = torch.zeros(n, taps_idx.shape[1], dtype=torch.long)
    weight = torch.zeros(n, taps_idx.shape[1])
    index[~is_newline], weight[~is_newline] = taps_idx, taps_w
    source = index.gather(1, weight.argmax(1, keepdim=True)).squeeze(1).masked_fill(is_newline, -1)
    return ImageSpec(
        n, tuple(segments), tuple(newline_at), tuple(extra), crops, source, kind, frames, (index, weight)
    )


def image_spec(
    cfg, image_size: list[int], patched: bool = True, aspect_ratio: str | None = None
) -> ImageSpec:
    """Token structure of one image of ``image_size`` (h, w) under config ``cfg``; ``patched=False``
    for an image of a multi-image prompt (base crop only).

    Example:
        >>> from transformers import LlavaOnevisionConfig, SiglipVisionConfig
        >>> cfg = LlavaOnevisionConfig(vision_config=SiglipVisionConfig(image_size=20, patch_size=4),
        ...     image_grid_pinpoints=[[40, 40]], vision_aspect_ratio="anyres_max_2")
        >>> spec = image_spec(cfg, [40, 40])  # 2 x 2 tiles: 10 x 10 tokens, downscaled to 7 x 7
        >>> spec.num_tokens, [(s.rows, s.cols) for s in spec.segments], spec.crops
        (81, [(5, 5), (7, 7)], 5)
    """
    side = cfg.vision_config.image_size // cfg.vision_config.patch_size
    per_crop = side * side
    base = GridSegment(offset=0, rows=side, cols=side, row_stride=side, name="base")
    base_idx = torch.arange(per_crop).unsqueeze(1)
    base_w = torch.ones(per_crop, 1)
    if not patched:
        return _spec(base_idx, base_w, (per_crop,), (base,), crops=1)
    gh, gw = hf_ov.get_anyres_image_grid_shape(
        image_size, cfg.image_grid_pinpoints, cfg.vision_config.image_size
    )
    # tower-token id of every cell of the tiled grid (tile t is tower crop 1 + t), then HF's own
    # unpad_image on it: it only slices, so the surviving ids are the surviving cells
    big_r = torch.arange(gh * side).view(-1, 1)
    big_c = torch.arange(gw * side).view(1, -1)
    crop = 1 + (big_r // side) * gw + big_c // side
    cells = hf_ov.unpad_image((crop * per_crop + (big_r % side) * side + big_c % side)[None], image_size)[0]
    rows, cols = cells.shape
    aspect_ratio = aspect_ratio or cfg.vision_aspect_ratio
    max_crops = int(aspect_ratio.strip("anyres_max_"))  # noqa: B005 (parsed exactly as the model does)
    ratio = math.sqrt(rows * cols / (max_crops * side**2))
    if ratio > 1.1:  # HF downscales the unpadded grid bilinearly
        rows, cols = int(rows // ratio), int(cols // ratio)
    tile_idx, tile_w = grid_taps(cells, rows, cols)
    taps_idx = torch.cat([base_idx.expand(-1, 4), tile_idx])
    taps_w = torch.cat([F.pad(base_w, (0, 3)), tile_w])
    newlines = tuple(per_crop + r * (cols + 1) + cols for r in range(rows))
    tiles = GridSegment(offset=per_crop, rows=rows, cols=cols, row_stride=cols + 1, name="crops")
    extra = (("crop_grid", (gh, gw)), ("crop_side", side))
    return _spec(taps_idx, taps_w, newlines, (base, tiles), crops=1 + gh * gw, extra=extra)


def video_spec(cfg, frames: int) -> ImageSpec:
    """Token structure of a video of ``frames`` frames: each frame's grid pooled bilinearly to
    ``ceil(side / 2)`` squared tokens, frame after frame, then one newline.

    Example:
        >>> from transformers import LlavaOnevisionConfig, SiglipVisionConfig
        >>> cfg = LlavaOnevisionConfig(vision_config=SiglipVisionConfig(image_size=384, patch_size=14))
        >>> spec = video_spec(cfg, 8)  # 27 x 27 patches pool to 14 x 14
        >>> spec.num_tokens, spec.frames, spec.newline_offsets
        (1569, 8, (1568,))
    """
    side = cfg.vision_config.image_size // cfg.vision_config.patch_size
    per_crop, pooled = side * side, math.ceil(side / 2)
    idx, w = grid_taps(torch.arange(per_crop).view(side, side), pooled, pooled)
    n = pooled * pooled
    taps_idx = torch.cat([idx + f * per_crop for f in range(frames)])
    segs = [GridSegment(f * n, pooled, pooled, pooled, name=f"frame{f}") for f in range(frames)]
    return _spec(
        taps_idx, w.repeat(frames, 1), (frames * n,), segs, crops=frames, kind="video", frames=frames
    )


class LlavaOnevisionAdapter(Adapter):
    family = "llava_onevision"
    supported_classes = ("LlavaOnevisionForConditionalGeneration", "LlavaOnevisionModel")
    has_cls = False  # vision-stage scores: the received-attention substitute, per crop

    _tower_layers = LlavaAdapter._tower_layers
    vision_attention = LlavaAdapter.vision_attention
    vision_block = LlavaAdapter.vision_block
    vision_layers_count = LlavaAdapter.vision_layers_count
    vision_feature_layer = LlavaAdapter.vision_feature_layer

    def check_tower_stage(self, method: str) -> None:
        """Tower stages: FlowCut and Zero-TPrune (their rules are written for these crops and
        resampled tokens; the other tower methods read CLS or Qwen merge units), and one feature layer."""
        if method not in ("flowcut", "zerotprune"):
            Adapter.check_tower_stage(self, method)
        LlavaAdapter.check_tower_stage(self, method)

    @property
    def tower_tokens_per_crop(self) -> int:
        vc = self.config.vision_config
        return (vc.image_size // vc.patch_size) ** 2  # no CLS

    def visual_token_ids(self) -> tuple[int, ...]:
        return (int(self.config.image_token_id), int(self.config.video_token_id))

    def media_token_ids(self) -> dict[str, tuple[int, ...]]:
        return {"image": (int(self.config.image_token_id),), "video": (int(self.config.video_token_id),)}

    def encoder_methods(self) -> tuple[str, ...]:
        return ("get_image_features", "get_video_features")

    def required_call_params(self) -> tuple[str, ...]:
        return ("image_sizes", "batch_num_images")

    def image_specs(self, call: dict) -> list[ImageSpec]:
        """Images (``pixel_values``), then videos (``pixel_values_videos``), in batch order."""
        specs = []
        if call.get("pixel_values") is not None or call.get("pixel_values_videos") is not None:
            if self.config.vision_feature_select_strategy != "full":
                raise ValueError(
                    "vtprune: LLaVA-OneVision needs vision_feature_select_strategy='full' (its SigLIP tower "
                    f"has no CLS token to drop), got {self.config.vision_feature_select_strategy!r}"
                )
        if call.get("pixel_values") is not None:
            sizes = call.get("image_sizes")
            if sizes is None:
                raise ValueError("vtprune: LLaVA-OneVision needs `image_sizes` from the processor")
            per_sample = call.get("batch_num_images")
            patched = (
                [True] * len(sizes)
                if per_sample is None
                else [int(n) == 1 for n in per_sample for _ in range(n)]
            )
            ratio = call.get("vision_aspect_ratio") or self.config.vision_aspect_ratio
            specs += [
                image_spec(self.config, s, p, ratio) for s, p in zip(torch.as_tensor(sizes).tolist(), patched)
            ]
        videos = call.get("pixel_values_videos")
        if videos is not None:
            specs += [video_spec(self.config, videos.shape[1]) for _ in range(videos.shape[0])]
        return specs
