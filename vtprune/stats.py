"""What the last prefill kept: the object ``vtprune.stats(model)`` returns."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class PruneStats:
    """Token accounting of the last prefill of a pruned model.

    Attributes:
        visual_tokens_in: visual tokens per sample before any pruning (mean over the batch).
        visual_tokens_in_per_sample: the same, per batch row.
        visual_tokens_per_layer: one number per decoder layer, mean over the batch.
        keep_ratio: ``mean(visual_tokens_per_layer) / visual_tokens_in`` (1.0 without images).
        kv_cache_lengths: per decoder layer, the sequence length its KV cache holds after prefill
            (the physical length, left padding of ragged batches included).
        overhead_s: time spent in the method itself (scoring, selection, gathering) in seconds;
            ``None`` (not measured) unless the plan was applied with ``timing=True``, because
            measuring it synchronises the GPU at every pruning point.
        selections: per stage key, the original positions of the visual tokens each row kept.
        kv_positions: with a per-layer KV stage (``prefixkv``), per decoder layer and row, the
            original positions (all tokens, not only visual) its KV cache kept after prefill;
            ``None`` otherwise.
        tower_tokens_per_layer: with a tower stage, the tokens (CLS included) each vision-tower
            layer ran on, one number per tower layer, mean over the images; ``None`` otherwise.

    Example:
        >>> s = vtprune.stats(model)  # doctest: +SKIP
        >>> s.visual_tokens_per_layer[:3], s.keep_ratio  # doctest: +SKIP
        ([576.0, 576.0, 144.0], 0.296875)
    """

    visual_tokens_in: float
    visual_tokens_in_per_sample: list[int]
    visual_tokens_per_layer: list[float]
    keep_ratio: float
    kv_cache_lengths: list[int]
    overhead_s: float | None = None
    selections: dict[str, list[torch.Tensor]] = field(default_factory=dict, repr=False)
    tower_tokens_per_layer: list[float] | None = None
    kv_positions: list[list[torch.Tensor]] | None = field(default=None, repr=False)

    @property
    def equivalent_tokens(self) -> float:
        """Mean visual tokens per layer: the papers' "equivalent token" count."""
        return sum(self.visual_tokens_per_layer) / max(1, len(self.visual_tokens_per_layer))

    @classmethod
    def from_state(cls, state, num_layers: int) -> PruneStats:
        counts = [s.visual.sum(1).float().mean().item() for s in state.sets]
        per_layer = [counts[state.layer_set[i]] for i in range(num_layers)]
        lengths = [state.sets[state.layer_set[i]].length for i in range(num_layers)]
        per_sample = state.visual_in.tolist()
        vin = float(sum(per_sample)) / max(1, len(per_sample))
        keep = (sum(per_layer) / num_layers) / vin if vin > 0 else 1.0
        tower = [
            img.vision["tower_tokens"]
            for row in getattr(state, "layouts", [])
            for img in row
            if "tower_tokens" in img.vision
        ]
        tower_mean = [sum(col) / len(tower) for col in zip(*tower)] if tower else None
        return cls(
            vin, per_sample, per_layer, keep, lengths, state.overhead_s, dict(state.selections), tower_mean
        )

    def as_dict(self) -> dict:
        return {
            "visual_tokens_in": self.visual_tokens_in,
            "visual_tokens_in_per_sample": self.visual_tokens_in_per_sample,
            "visual_tokens_per_layer": self.visual_tokens_per_layer,
            "equivalent_tokens": self.equivalent_tokens,
            "keep_ratio": self.keep_ratio,
            "kv_cache_lengths": self.kv_cache_lengths,
            "overhead_s": self.overhead_s,
            "tower_tokens_per_layer": self.tower_tokens_per_layer,
        }
