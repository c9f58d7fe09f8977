"""LLaVA-1.5 (``LlavaForConditionalGeneration``): CLIP tower, MLP projector, Llama decoder."""

from __future__ import annotations

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

    def image_specs(self, call: dict) -> list[ImageSpec]:
        pixel_values = call.get("pixel_values")
        if pixel_values is None:
            return []
        n_images = pixel_values.shape[0]
        tokens, side, lead = self.tokens_per_image()
        seg = GridSegment(offset=lead, rows=side, cols=side, row_stride=side, name="image")
        return [ImageSpec(num_tokens=tokens, segments=(seg,)) for _ in range(n_images)]
