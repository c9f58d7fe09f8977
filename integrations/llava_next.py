"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``): anyres crops and row-newline tokens.

HF packs each image as ``[base tokens][for each row of the unpadded crop grid: row tokens +
1 image_newline]`` (``pack_image_features``); an image given as a single crop gets the base
tokens and one trailing newline. Token counts therefore differ per image size.

Newline tokens are learned vectors that mark the end of a row, not image patches. vtprune
counts them as visual tokens (PyramidDrop's N includes them) and flags them in the layout, so
each method states what it does with them (``protect_newlines`` on the vision-stage methods).
"""

from __future__ import annotations

import torch
from transformers.models.llava_next import modeling_llava_next as hf_next

from .base import Adapter, GridSegment, ImageSpec
from .llava import LlavaAdapter


class LlavaNextAdapter(Adapter):
    family = "llava_next"
    supported_classes = ("LlavaNextForConditionalGeneration", "LlavaNextModel")

    _tower_layers = LlavaAdapter._tower_layers
    vision_attention = LlavaAdapter.vision_attention
    vision_block = LlavaAdapter.vision_block
    vision_layers_count = LlavaAdapter.vision_layers_count
    vision_feature_layer = LlavaAdapter.vision_feature_layer
    tower_projector = LlavaAdapter.tower_projector
    tower_tokens_per_crop = LlavaAdapter.tower_tokens_per_crop

    def check_tower_stage(self, method: str) -> None:
        """Tower stages need one feature layer and the "default" strategy (CLS not an image token:
        the crop grid the packing reshapes holds patches only)."""
        LlavaAdapter.check_tower_stage(self, method)
        if self.config.vision_feature_select_strategy != "default":
            raise NotImplementedError(
                f"vtprune: {method} prunes inside the vision tower, which on LLaVA-NeXT needs "
                f"vision_feature_select_strategy='default', not "
                f"{self.config.vision_feature_select_strategy!r}"
            )

    def required_call_params(self) -> tuple[str, ...]:
        return ("image_sizes",)

    def image_specs(self, call: dict) -> list[ImageSpec]:
        if call.get("pixel_values") is None:
            return []
        image_sizes = call.get("image_sizes")
        if image_sizes is None:
            raise ValueError("vtprune: LLaVA-NeXT needs `image_sizes` from the processor")
        return [self._spec(size) for size in torch.as_tensor(image_sizes).tolist()]

    def _spec(self, image_size: list[int]) -> ImageSpec:
        cfg = self.config
        vc = cfg.vision_config
        side = vc.image_size // vc.patch_size
        lead = 0 if cfg.vision_feature_select_strategy == "default" else 1
        base_tokens = side * side + lead
        base = GridSegment(offset=lead, rows=side, cols=side, row_stride=side, name="base")
        per_crop = side * side + 1  # tower tokens per crop, CLS first
        base_source = torch.arange(base_tokens) + (1 - lead)
        n_crops = hf_next.image_size_to_num_patches(image_size, cfg.image_grid_pinpoints, vc.image_size) - 1
        if n_crops == 0:
            source = torch.cat([base_source, torch.tensor([-1])])
            return ImageSpec(base_tokens + 1, (base,), newline_offsets=(base_tokens,), source=source)
        gh, gw = hf_next.get_anyres_image_grid_shape(image_size, cfg.image_grid_pinpoints, vc.image_size)
        # unpad_image only slices: run it on a map of (row, col) cell ids to know which cells survive
        cells = torch.arange(gh * side * gw * side).view(1, gh * side, gw * side)
        kept = hf_next.unpad_image(cells, image_size)[0]
        rows, cols = kept.shape
        big_r, big_c = kept // (gw * side), kept % (gw * side)
        crop = 1 + (big_r // side) * gw + big_c // side
        local = (big_r % side) * side + big_c % side
        crop_source = torch.cat([crop * per_crop + 1 + local, torch.full((rows, 1), -1)], dim=1).flatten()
        crops = GridSegment(offset=base_tokens, rows=rows, cols=cols, row_stride=cols + 1, name="crops")
        newlines = tuple(base_tokens + r * (cols + 1) + cols for r in range(rows))
        extra = (("crop_grid", (gh, gw)), ("crop_side", side))
        source = torch.cat([base_source, crop_source])
        return ImageSpec(
            base_tokens + rows * (cols + 1), (base, crops), newlines, extra, crops=1 + n_crops, source=source
        )
