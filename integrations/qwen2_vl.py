"""Qwen2-VL (``Qwen2VLForConditionalGeneration``): own ViT with a 2x2 patch merger, 3-D M-RoPE.

Each image contributes ``t * (h / m) * (w / m)`` tokens (``image_grid_thw`` rows, merge size m),
laid out frame by frame in row-major order. Positions are 3-D (t, h, w) per visual token; the
runtime gathers every row of the position tensor so kept tokens keep them.
"""

from __future__ import annotations

import torch

from .base import Adapter, GridSegment, ImageSpec


class Qwen2VLAdapter(Adapter):
    family = "qwen2_vl"
    supported_classes = (
        "Qwen2VLForConditionalGeneration",
        "Qwen2VLModel",
        "Qwen2_5_VLForConditionalGeneration",
        "Qwen2_5_VLModel",
    )

    has_cls = False  # vision-stage scores: the received-attention substitute (vtprune.runtime.vision)

    @property
    def patches_per_token(self) -> int:
        return self.config.vision_config.spatial_merge_size**2

    @property
    def vision_tower(self):
        return self.mm_model.visual

    def vision_block(self, layer: int):
        return self.mm_model.visual.blocks[layer]

    def vision_attention(self, layer: int):
        return self.mm_model.visual.blocks[layer].attn

    @property
    def vision_layers_count(self) -> int:
        return len(self.mm_model.visual.blocks)

    def vision_feature_layer(self) -> int:
        return self.vision_layers_count - 1

    def visual_token_ids(self) -> tuple[int, ...]:
        ids = [int(self.config.image_token_id)]
        if getattr(self.config, "video_token_id", None) is not None:
            ids.append(int(self.config.video_token_id))
        return tuple(ids)

    def required_call_params(self) -> tuple[str, ...]:
        return ("image_grid_thw", "video_grid_thw", "mm_token_type_ids")

    def encoder_methods(self) -> tuple[str, ...]:
        return ("get_image_features", "get_video_features")

    def image_specs(self, call: dict) -> list[ImageSpec]:
        merge = self.config.vision_config.spatial_merge_size
        specs = []
        # HF scatters all images first, then all videos; in the prompt they may interleave, so
        # only prompts whose media are all images or all videos are laid out here.
        grids = [g for key in ("image_grid_thw", "video_grid_thw") if (g := call.get(key)) is not None]
        if len(grids) > 1:
            raise NotImplementedError("vtprune: prompts mixing images and videos are not supported yet")
        for grid in grids:
            for t, h, w in torch.as_tensor(grid).tolist():
                rows, cols = h // merge, w // merge
                segs = tuple(
                    GridSegment(
                        offset=f * rows * cols, rows=rows, cols=cols, row_stride=cols, name=f"frame{f}"
                    )
                    for f in range(t)
                )
                n = t * rows * cols
                specs.append(ImageSpec(n, segs, source=torch.arange(n)))
        return specs

    def prefill_position_ids(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        b, n = inputs_embeds.shape[:2]
        return torch.arange(n, device=inputs_embeds.device).view(1, 1, n).expand(3, b, n)

    def decode_position_ids(self, seen: int, q_len: int, batch: int, device) -> torch.Tensor:
        text = super().decode_position_ids(seen, q_len, batch, device)
        deltas = getattr(self.mm_model, "rope_deltas", None)
        pos = text.unsqueeze(0).expand(3, batch, q_len)
        if deltas is not None:
            pos = pos + deltas.to(device).repeat_interleave(batch // deltas.shape[0], dim=0)
        return pos
