"""PrefixKV (Wang et al., NeurIPS 2025): a different KV-cache budget per layer, set by one global level.

* Prefill runs unpruned. At every decoder layer the importance of each cached position is the
  attention it receives, summed over all query rows and averaged over heads (H2O-style),
  computed beside SDPA/FlashAttention from the layer's own post-rotary q/k with
  ``key_attention_colsum`` (the ``[N, N]`` matrix is never stored).
* Budgets: one cumulative-importance level ``p`` shared by all layers; a layer keeps the
  positions that hold ``p`` of its attention (:func:`vtprune.kv_budget.forget_counts`), with
  ``p`` set so the layers together keep ``keep`` of all prompt positions.
* After prefill each layer's KV cache keeps only its budget (all tokens, text and visual): the
  first ``sink`` tokens and the last token are protected, the others go lowest importance
  first. Decoding continues at the original positions over the shortened caches.
* ``profile``: budgets profiled offline (:func:`vtprune.profile_prefixkv`, a
  :class:`~vtprune.kv_profile.PrefixKVProfile` or its JSON path) give each layer
  ``round((1 - retention_l) * n)`` evictions, as the official online mode does. Without a
  profile the same rule runs on the request itself (each row's own level ``p``), which is what
  the official profiler computes per calibration sample.

Deviations from the official code (github.com/THU-MIG/PrefixKV @39b7265), also in the README:

* No eviction during generation: the official code evicts one cached token per step once a
  layer exceeds its share of the growing sequence (at a fixed index 25 slots before the end of
  the prompt's kept cache); here generated tokens are all kept, so the budgets bound the
  prompt's KV only.
* Scores come from SDPA-side q/k (not eager attentions); padded rows score over their own real
  tokens and every row of a batch gets its own budgets (the official code is batch-1).
* The bisection stops after 64 halvings if it never gets within 5 positions (the official loop
  has no cap); the per-layer counts are clamped to the evictable positions after the rescale.
* Profiles store retention fractions for a grid of budgets; a ``keep`` between two profiled
  budgets interpolates their per-layer fractions linearly (the official code ships one file per
  ratio).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

import vtprune.kernels as kernels
from vtprune.config import MethodConfig, ModelInfo, check_int, register_method
from vtprune.kv_budget import evict, forget_counts
from vtprune.kv_profile import PrefixKVProfile
from vtprune.stages import DecodeStage


@register_method("prefixkv")
@dataclass
class PrefixKV(MethodConfig):
    """PrefixKV per-layer KV budgets (decode stage, all tokens).

    Args:
        keep: the fraction of the prompt's KV positions kept, averaged over layers (default 0.5).
            ``keep=1`` keeps every position (the unpruned model).
        profile: budgets from :func:`vtprune.profile_prefixkv` (a ``PrefixKVProfile`` or its
            JSON path); ``None`` derives them from each request's own attention.
        sink: first tokens of each row that are never evicted (4; the last token is too).

    ``keep`` counts all prompt tokens in the KV cache, not visual tokens: the prefill (and so
    ``stats(model).keep_ratio``) is unpruned; ``stats(model).kv_cache_lengths`` and
    ``kv_positions`` show what each layer kept.

    Example:
        >>> PrefixKV(keep=0.3).stages(ModelInfo(num_layers=4, family="llava"))[0].tap_layers(4)
        {0, 1, 2, 3}
    """

    profile: object = None
    sink: int = 4

    def validate(self) -> None:
        check_int(self.name, "sink", self.sink, minimum=0)
        if self.profile is not None and not isinstance(self.profile, (PrefixKVProfile, str, os.PathLike)):
            raise ValueError(
                f"prefixkv: option 'profile'={self.profile!r} is invalid; allowed: a PrefixKVProfile from "
                "vtprune.profile_prefixkv or the path of its JSON file"
            )

    def stages(self, info: ModelInfo) -> list:
        keep = 0.5 if self.keep is None else float(self.keep)
        retention = None
        if self.profile is not None and keep < 1:
            prof = (
                self.profile
                if isinstance(self.profile, PrefixKVProfile)
                else PrefixKVProfile.load(self.profile)
            )
            retention = prof.retention(keep, info.num_layers)
        return [PrefixKVStage(keep, retention, self.sink)]


class PrefixKVStage(DecodeStage):
    """Scores every cached position at prefill, then shortens each layer's cache to its budget."""

    reindex = False

    def __init__(self, keep: float, retention: list[float] | None, sink: int):
        super().__init__(first_layer=0, key="prefixkv")
        self.keep, self.retention, self.sink = keep, retention, sink
        #: set to a list by ``profile_prefixkv``: each row's per-layer scores are appended to it
        self.record: list | None = None

    def tap_layers(self, num_layers: int) -> set[int]:
        return set(range(num_layers))

    @torch.no_grad()
    def observe(self, layer: int, query, key, valid, scaling: float, state) -> None:
        if self.keep >= 1 and self.record is None:
            return  # keep everything: nothing to score
        scores = kernels.key_attention_colsum(query, key, valid, valid, scaling)
        state.step.memo.setdefault(self.key, {})[layer] = scores

    def layer_keep(self, state) -> dict[int, torch.Tensor]:
        scores = state.step.memo.get(self.key)
        if not scores:
            return {}
        layers = sorted(scores)
        sets = {i: state.sets[state.layer_set[i]] for i in layers}
        valid = {i: sets[i].valid.to(scores[i].device) for i in layers}
        if self.record is not None:
            for b in range(state.batch):
                self.record.append([scores[i][b][valid[i][b]].cpu() for i in layers])
        if self.keep >= 1:
            return {}
        keep = {i: torch.zeros_like(valid[i]) for i in layers}
        for b in range(state.batch):
            real = [scores[i][b][valid[i][b]] for i in layers]
            forget = self.forget(real)
            for i, f in zip(layers, forget):
                keep[i][b] = evict(scores[i][b], valid[i][b], f, self.sink)
        return keep

    def forget(self, real: list[torch.Tensor]) -> list[int]:
        """Per layer, how many of one row's positions go (``real``: each layer's scores of its real slots)."""
        if self.retention is None:
            return forget_counts(real, self.keep, self.sink + 1)
        return [round((1.0 - r) * s.numel()) for r, s in zip(self.retention, real)]
