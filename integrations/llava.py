"""LLaVA-1.5 (``LlavaForConditionalGeneration``): CLIP tower, MLP projector, Llama decoder."""

from __future__ import annotations

import torch

from .base import Adapter, GridSegment, ImageSpec


class LlavaAdapter(Adapter):
    """Each image is one square grid of ``(image_size / patch_size)**2`` tokens (CLS dropped)."""

    family = "llava"
    supported_classes = ("LlavaForConditionalGeneration", "LlavaModel")

    def tokens_per_image(self) -> tuple[int, int, int]:
        """(tokens, grid side, leading non-grid tokens) for one image."""
        vc = self.config.vision_config
        side = vc.image_size // vc.patch_size
        lead = 0 if self.config.vision_feature_select_strategy == "default" else 1
        return side * side + lead, side, lead

    def _tower_layers(self):
        tower = self.vision_tower
        return getattr(tower, "vision_model", tower).encoder.layers

    def vision_block(self, layer: int):
        return self._tower_layers()[layer]

    def vision_attention(self, layer: int):
        return self._tower_layers()[layer].self_attn

    @property
    def vision_layers_count(self) -> int:
        return len(self._tower_layers())

    def vision_feature_layer(self) -> int:
        """hidden_states[k] is the output of layer k-1: LLaVA's -2 is the output of layer L-2."""
        k = self.config.vision_feature_layer
        k = k if isinstance(k, int) else k[-1]
        return (k % (self.vision_layers_count + 1)) - 1

    @property
    def tower_tokens_per_crop(self) -> int:
        vc = self.config.vision_config
        return (vc.image_size // vc.patch_size) ** 2 + 1

    def check_tower_stage(self, method: str) -> None:
        """Tower stages need one feature layer (several layers' features would differ in length)."""
        if not isinstance(self.config.vision_feature_layer, int):
            raise NotImplementedError(
                f"vtprune: {method} prunes inside the vision tower, which needs one vision_feature_layer; "
                f"this model concatenates layers {self.config.vision_feature_layer}"
            )

    def tower_projector(self):
        """The projector, when the features come from one tower layer (several are concatenated
        per token before it otherwise)."""
        if not isinstance(self.config.vision_feature_layer, int):
            return None
        return self.mm_model.multi_modal_projector

    def image_specs(self, call: dict) -> list[ImageSpec]:
        pixel_values = call.get("pixel_values")
        if pixel_values is None:
            return []
        n_images = pixel_values.shape[0]
        tokens, side, lead = self.tokens_per_image()
        seg = GridSegment(offset=lead, rows=side, cols=side, row_stride=side, name="image")
        # the tower emits CLS + patches; "default" drops CLS, so token i comes from tower token i+1
        source = torch.arange(tokens) + (1 - lead)
        return [ImageSpec(num_tokens=tokens, segments=(seg,), source=source) for _ in range(n_images)]
