"""FLOPs of a decoder forward: counted on the real forward, and by formula.

``torch.utils.flop_counter.FlopCounterMode`` counts every matmul the forward really runs
(it does not count CPU SDPA kernels, so attention is added by formula where needed). The paper
formula (PyramidDrop appendix) is per layer ``4nd^2 + 2n^2d + 3ndm`` with ``n`` tokens.
The vision tower's layers are counted by formula from the tokens each layer runs on
(:func:`tower_flops`), which tower stages reduce layer by layer.
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


def _tower_dims(vision_config) -> tuple[int, int, int]:
    """(width, MLP width, MLP matrices) of a vision tower's layers."""
    d = getattr(vision_config, "embed_dim", None) or vision_config.hidden_size  # Qwen2-VL: embed_dim
    m = getattr(vision_config, "intermediate_size", None) or int(d * vision_config.mlp_ratio)
    # Qwen2.5-VL's tower MLP is gated (gate, up, down); CLIP, SigLIP, Qwen2-VL and Qwen3-VL use two
    gated = getattr(vision_config, "model_type", "") == "qwen2_5_vl_vision"
    return d, m, 3 if gated else 2


def tower_linear_flops(vision_config, tokens_per_layer: list[float]) -> float:
    """Matmul FLOPs of the projections and MLP of every vision-tower layer (q, k, v, out
    projections and a two-matrix MLP: CLIP, SigLIP, Qwen2-VL, Qwen3-VL; three matrices for
    Qwen2.5-VL's gated MLP), ``tokens_per_layer`` counting CLS.

    Example:
        >>> from transformers import CLIPVisionConfig
        >>> cfg = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_attention_heads=16)
        >>> round(tower_linear_flops(cfg, [577] * 24) / 1e12, 3)  # CLIP-L/336 as in LLaVA-1.5
        0.348
    """
    d, m, mats = _tower_dims(vision_config)
    return float(sum(2 * n * (4 * d * d + mats * d * m) for n in tokens_per_layer))


def tower_attention_flops(vision_config, sequences_per_layer: list[list[float]]) -> float:
    """``QK^T`` and ``PV`` FLOPs of the tower's attention: per layer, the lengths of the attention
    sequences it runs (crops, images, or Qwen2.5-VL's windows), ``4 n^2 d`` each.

    Example:
        >>> from transformers import CLIPVisionConfig
        >>> cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4)
        >>> tower_attention_flops(cfg, [[5, 5], [3]])  # 4 * (25 + 25 + 9) * 32
        7552.0
    """
    d, _, _ = _tower_dims(vision_config)
    return float(sum(4 * n * n * d for seqs in sequences_per_layer for n in seqs))


def tower_flops(vision_config, tokens_per_layer: list[float], sequences: int = 1) -> float:
    """FLOPs of the tower's layers (projections, MLP and attention) for ``tokens_per_layer`` tokens
    per layer split evenly over ``sequences`` attention sequences (the crops of one image); what
    ``vtprune.stats(model).tower_tokens_per_layer`` records feeds it directly. Patch embedding and
    norms outside the layers are not included.

    Example:
        >>> from transformers import CLIPVisionConfig
        >>> cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4)
        >>> tower_flops(cfg, [5, 3])  # 2 * 8 * (4 * 32^2 + 2 * 32 * 64) + 4 * (25 + 9) * 32
        135424.0
    """
    seqs = [[n / sequences] * sequences for n in tokens_per_layer]
    return tower_linear_flops(vision_config, tokens_per_layer) + tower_attention_flops(vision_config, seqs)
