"""Small LLaVA-1.5-architecture configurations, for benchmarks and tests (random weights)."""

from __future__ import annotations

from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig


def llava_config(
    width: int,
    layers: int,
    *,
    image_size: int = 336,
    patch_size: int = 14,
    vision_hidden: int = 64,
    tower_layers: int = 2,
    heads: int | None = None,
    kv_heads: int | None = None,
    intermediate: int | None = None,
    vocab: int = 1000,
    image_token_id: int = 999,
    max_positions: int = 2048,
    **text_overrides,
) -> LlavaConfig:
    """A LLaVA-1.5 configuration with the real token geometry at a chosen width.

    ``image_size / patch_size`` squared visual tokens per image (576 by default); the MLP keeps
    LLaVA-1.5-7B's 11008/4096 ratio unless ``intermediate`` is given. The CLIP tower is
    ``tower_layers`` deep (2 by default: it runs in every prefill without being what is measured;
    methods that read two tower layers, such as VScan's scans at layers 5 and -2 of CLIP-L's 24,
    need a deeper one to read distinct layers).

    Example:
        >>> cfg = llava_config(64, 4)
        >>> cfg.text_config.intermediate_size, cfg.vision_config.image_size // cfg.vision_config.patch_size
        (172, 24)
        >>> llava_config(64, 4, tower_layers=24).vision_config.num_hidden_layers
        24
    """
    heads = heads or max(1, width // 64)
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=2 * vision_hidden,
        num_hidden_layers=tower_layers,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
    )
    text = LlamaConfig(
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=intermediate or int(width * 11008 / 4096),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads,
        max_position_embeddings=max_positions,
        **text_overrides,
    )
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=image_token_id, vision_feature_layer=-2
    )
