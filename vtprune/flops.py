"""FLOPs of a decoder forward: counted on the real forward, and by formula.

``torch.utils.flop_counter.FlopCounterMode`` counts every matmul the forward really runs
(it does not count CPU SDPA kernels, so attention is added by formula where needed). The paper
formula (PyramidDrop appendix) is per layer ``4nd^2 + 2n^2d + 3ndm`` with ``n`` tokens.
"""

from __future__ import annotations

from torch.utils.flop_counter import FlopCounterMode


def count_flops(fn, *args, **kwargs) -> tuple[int, object]:
    """Run ``fn(*args, **kwargs)`` under ``FlopCounterMode``; return (total FLOPs, result).

    Example:
        >>> flops, _ = count_flops(torch.matmul, torch.ones(2, 3), torch.ones(3, 4))
        >>> flops
        48
    """
    with FlopCounterMode(display=False) as counter:
        out = fn(*args, **kwargs)
    return counter.get_total_flops(), out


def paper_flops(tokens_per_layer: list[float], hidden: int, intermediate: int) -> float:
    """Sum over layers of ``4nd^2 + 2n^2d + 3ndm`` (the PyramidDrop/FastV papers' convention).

    Example:
        >>> round(paper_flops([576] * 32, 4096, 11008) / 1e12, 2)  # LLaVA-1.5-7B, 576 tokens
        3.82
    """
    d, m = hidden, intermediate
    return float(sum(4 * n * d * d + 2 * n * n * d + 3 * n * d * m for n in tokens_per_layer))


def _dims(cfg) -> tuple[int, int, int, int, int]:
    d = cfg.hidden_size
    h = cfg.num_attention_heads
    hkv = getattr(cfg, "num_key_value_heads", None) or h
    hd = getattr(cfg, "head_dim", None) or d // h
    return d, h, hkv, hd, cfg.intermediate_size


def decoder_linear_flops(text_config, tokens_per_layer: list[float]) -> float:
    """Matmul FLOPs of the projections and MLP of every decoder layer (2 FLOPs per MAC)."""
    d, h, hkv, hd, m = _dims(text_config)
    per_token = d * h * hd + 2 * d * hkv * hd + h * hd * d + 3 * d * m
    return float(sum(2 * n * per_token for n in tokens_per_layer))


def attention_flops(text_config, tokens_per_layer: list[float]) -> float:
    """``QK^T`` and ``PV`` FLOPs of a dense (unmasked-count) attention over ``n`` tokens per layer."""
    _, h, _, hd, _ = _dims(text_config)
    return float(sum(4 * n * n * h * hd for n in tokens_per_layer))


def tower_linear_flops(vision_config, tokens_per_layer: list[float]) -> float:
    """Matmul FLOPs of the projections and MLP of every vision-tower layer (q, k, v, out
    projections and a two-matrix MLP: CLIP, Qwen2-VL), ``tokens_per_layer`` counting CLS.

    Example:
        >>> from transformers import CLIPVisionConfig
        >>> cfg = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_attention_heads=16)
        >>> round(tower_linear_flops(cfg, [577] * 24) / 1e12, 3)  # CLIP-L/336 as in LLaVA-1.5
        0.348
    """
    d = getattr(vision_config, "embed_dim", None) or vision_config.hidden_size  # Qwen2-VL: embed_dim
    m = getattr(vision_config, "intermediate_size", None) or int(d * vision_config.mlp_ratio)
    return float(sum(2 * n * (4 * d * d + 2 * d * m) for n in tokens_per_layer))
