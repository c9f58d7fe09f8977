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
    supported_classes = ("Qwen2VLForConditionalGeneration", "Qwen2VLModel")
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

    def media_token_ids(self) -> dict[str, tuple[int, ...]]:
        ids = {"image": (int(self.config.image_token_id),)}
        if getattr(self.config, "video_token_id", None) is not None:
            ids["video"] = (int(self.config.video_token_id),)
        return ids

    def required_call_params(self) -> tuple[str, ...]:
        return ("image_grid_thw", "video_grid_thw", "mm_token_type_ids")

    def check_tower_stage(self, method: str) -> None:
        """Qwen2-VL's blocks see the patches in token order: tower stages run (merge groups whole)."""

    def check_call(self, call: dict) -> None:
        """Refuse a prompt with visual placeholders but no (or inconsistent) ``mm_token_type_ids``.

        transformers builds the 3-D M-RoPE positions from ``mm_token_type_ids``; without it the
        model silently falls back to 1-D positions, and pruned tokens would carry those.
        """
        ids = call.get("input_ids")
        if ids is None:
            return
        visual = torch.isin(ids, torch.tensor(self.visual_token_ids(), device=ids.device))
        if not bool(visual.any()):
            return
        types = call.get("mm_token_type_ids")
        name = type(self.mm_model).__name__
        if types is None:
            raise ValueError(
                f"vtprune: this {name} prompt holds image/video placeholder tokens but no "
                "mm_token_type_ids; without it transformers silently falls back to 1-D positions "
                "instead of 3-D M-RoPE. Pass the processor's mm_token_type_ids (text 0, image 1, video 2) "
                "with input_ids"
            )
        if types.shape != ids.shape or bool((types.to(ids.device)[visual] == 0).any()):
            raise ValueError(
                f"vtprune: mm_token_type_ids does not match input_ids ({name}): it must have their shape "
                "and mark every image/video placeholder token (image 1, video 2)"
            )

    def encoder_methods(self) -> tuple[str, ...]:
        return ("get_image_features", "get_video_features")

    def image_specs(self, call: dict) -> list[ImageSpec]:
        """Images (``image_grid_thw``) then videos (``video_grid_thw``): each kind is placed in its
        own placeholders (``Adapter.layouts``), so the two may interleave in the prompt. A video's
        frames are its ``t`` temporal patches (2-frame tubelets), one grid segment each."""
        merge = self.config.vision_config.spatial_merge_size
        specs = []
        for kind, key in (("image", "image_grid_thw"), ("video", "video_grid_thw")):
            grid = call.get(key)
            if grid is None:
                continue
            for t, h, w in torch.as_tensor(grid).tolist():
                rows, cols = h // merge, w // merge
                segs = tuple(
                    GridSegment(
                        offset=f * rows * cols, rows=rows, cols=cols, row_stride=cols, name=f"frame{f}"
                    )
                    for f in range(t)
                )
                n = t * rows * cols
                specs.append(ImageSpec(n, segs, source=torch.arange(n), kind=kind, frames=t))
        return specs

    def prefill_position_ids(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        b, n = inputs_embeds.shape[:2]
        return torch.arange(n, device=inputs_embeds.device).view(1, 1, n).expand(3, b, n)

    def decode_position_ids(
        self, seen: int, q_len: int, batch: int, device, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """3-D positions of new tokens: text position + the model's per-row ``rope_deltas``.

        As transformers does for Qwen: with a 2-D mask the text position counts each row's real
        tokens (a left-padded row's pads do not advance it), since ``rope_deltas`` (max position
        + 1 - real tokens, per row, from the unpruned prompt) is relative to that count.
        """
        if attention_mask is not None and attention_mask.dim() == 2:
            mask = attention_mask.to(device).long()
            text = (mask.cumsum(-1) - 1).clamp(min=0)[:, -q_len:]
        else:
            text = super().decode_position_ids(seen, q_len, batch, device)
        deltas = getattr(self.mm_model, "rope_deltas", None)
        pos = text.unsqueeze(0).expand(3, batch, q_len)
        if deltas is not None:
            pos = pos + deltas.to(device).repeat_interleave(batch // deltas.shape[0], dim=0)
        return pos
