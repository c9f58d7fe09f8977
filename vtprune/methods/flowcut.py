"""FlowCut: drop patch tokens inside the vision tower, following the CLS token's information flow.

Tong et al., "FlowCut: Rethinking Redundancy via Information Flow for Efficient Vision-Language
Models" (NeurIPS 2025). A tower stage (``vtprune.stages.TowerStage``): tokens leave the CLIP
tower between its layers, so later tower layers, the projector and the language model all run
on fewer tokens.

After every tower layer ``l`` before the feature layer ``F`` (LLaVA: the second-to-last), per
image, over its remaining patches ``j``:

* relation ``a_j``: the CLS query's attention to patch ``j`` (softmax over all keys, mean over
  heads), renormalised over the patches;
* semantic ``s_j``: per head ``softmax_t(v_cls . v_t)`` over all tokens (no scaling), mean over
  heads, renormalised over the patches;
* density ``rho_j = || mean_h v_j ||_1``; score ``(a_j + s_j) * rho_j``;
* cumulative score ``C = score`` at the first layer, then ``0.5 * C + 0.5 * score``;
* with ``rpl = F - l - 1`` layers left, when ``rpl`` is even the image drops
  ``round((n - k) / sqrt(rpl) * (1 - H^2))`` patches (``n`` present, ``k`` the target, ``H`` the
  entropy of ``a`` over ``log n``), never going below ``k``, keeping the highest ``C``; at
  ``rpl = 0`` it keeps exactly ``k``. CLS always stays.

``keep`` is the fraction of the image's language-model tokens that reach the language model
(all decoder layers see that many): ``k = round(keep * tokens)``; CLS counts among them only with
LLaVA's "full" feature strategy. The official default ``target_num=64`` is ``keep = 64/576``.

Deviations from the official code (github.com/TungChintao/FlowCut, a2ecd24):

* the CLS row is computed beside SDPA from the layer's own q/k/v projections (one query row),
  not by switching the tower's attention to a full eager matrix; the same numbers;
* the drop count is computed per image, not as the maximum over the batch, so an image keeps
  the same tokens whatever else is in the batch (shorter rows are padded and masked);
* scores are computed in float32 and ``0 log 0`` counts as 0 in the entropy.

Qwen2-VL (no CLS): the row is the "global" one, the mean query of the image's patches against
their keys (rotary applied), times ``|| mean_h v_j ||_1``, with no semantic term, as the official
port; the schedule runs over all blocks, its last drop just before the merger. Unlike the port:

* whole 2x2 merge groups are scored (the sum of their four patches' scores and relations) and
  kept or dropped together, so the merger still merges neighbouring patches (the port drops
  single patches, and the merger then merges unrelated ones);
* each image (video frame) is scored, scheduled and given ``round(keep * tokens)`` on its own,
  over its own patches (the port is batch size 1 and takes the mean over the whole tower input);
* the tower goes straight to ``k`` tokens: the port keeps ``4k`` patches (``k`` merged tokens'
  worth of them, broken groups aside) and prunes to ``k`` again at LLM layer 1, not done here.

Supported on LLaVA-1.5 and Qwen2-VL; LLaVA-NeXT and Qwen2.5-VL are refused with a clear error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vtprune.config import MethodConfig, ModelInfo, _invalid, register_method
from vtprune.stages import TowerContext, TowerStage

DEFAULT_KEEP = 64 / 576  # the official default target_num=64 on LLaVA-1.5


@register_method("flowcut")
@dataclass
class FlowCut(MethodConfig):
    """FlowCut (Tong et al., 2025): progressive pruning inside the vision tower.

    Args:
        keep: fraction of each image's tokens that reach the language model (default 64/576,
            the official ``target_num=64``).
        smoothing: weight of the earlier layers' cumulative score in the per-layer update
            ``C = smoothing * C + (1 - smoothing) * score`` (official 0.5); a number in [0, 1).

    Example:
        >>> FlowCut(keep=0.25).smoothing
        0.5
    """

    smoothing: float = 0.5

    def validate(self) -> None:
        ok = isinstance(self.smoothing, (int, float)) and not isinstance(self.smoothing, bool)
        if not ok or not 0 <= self.smoothing < 1:
            raise _invalid(self.name, "smoothing", self.smoothing, "a number in [0, 1)")

    def stages(self, info: ModelInfo) -> list:
        return [FlowCutStage(DEFAULT_KEEP if self.keep is None else self.keep, float(self.smoothing))]


def flowcut_scores(cls_probs: torch.Tensor, values: torch.Tensor, valid: torch.Tensor):
    """Per slot ``(relation, score)`` of one tower layer; CLS (slot 0) and padding get 0.

    ``cls_probs`` ``[B, H, T]`` is the CLS attention row, ``values`` ``[B, H, T, d]``, ``valid``
    ``[B, T]``. Relation and semantic terms are renormalised over the patches.

    Example:
        >>> probs = torch.tensor([[[0.4, 0.2, 0.4]]])
        >>> values = torch.tensor([[[[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]]]])
        >>> rel, score = flowcut_scores(probs, values, torch.ones(1, 3, dtype=torch.bool))
        >>> [round(x, 3) for x in rel[0].tolist()]
        [0.0, 0.333, 0.667]
    """
    patches = valid.clone()
    patches[:, 0] = False
    relation = cls_probs.mean(1) * patches
    relation = relation / relation.sum(1, keepdim=True).clamp_min(1e-30)
    sim = (values[:, :, :1] * values).sum(-1)  # [B, H, T]: v_cls . v_t, no scaling
    semantic = torch.softmax(sim.masked_fill(~valid[:, None], float("-inf")), dim=-1).mean(1) * patches
    semantic = semantic / semantic.sum(1, keepdim=True).clamp_min(1e-30)
    density = values.mean(1).abs().sum(-1)
    return relation, (relation + semantic) * density


def drop_counts(relation: torch.Tensor, present: torch.Tensor, target: int, rpl: int) -> torch.Tensor:
    """Patches each image keeps after a pruning layer with ``rpl`` pruning layers' worth left.

    ``present`` ``[B]`` counts the patches now; the image drops
    ``round((n - target) / sqrt(rpl) * (1 - H^2))`` (``H``: entropy of ``relation`` over
    ``log n``), never below ``target``; ``rpl == 0`` goes straight to ``target``.

    Example:
        >>> uniform = torch.full((1, 5), 0.25)
        >>> uniform[0, 0] = 0  # slot 0 is CLS
        >>> drop_counts(uniform, torch.tensor([4]), 1, 4).tolist()  # flat attention: drop nothing
        [4]
        >>> drop_counts(uniform, torch.tensor([4]), 1, 0).tolist()
        [1]
    """
    target = torch.as_tensor(target, device=present.device).expand_as(present)
    if rpl == 0:
        return target.minimum(present)
    n = present.float()
    entropy = -torch.xlogy(relation, relation).sum(1)
    ratio = torch.where(n > 1, entropy / n.clamp_min(2).log(), torch.ones_like(n))
    r = torch.round((n - target) / math.sqrt(rpl) * (1 - ratio**2))
    return torch.maximum(present - r.long(), target).minimum(present)


class FlowCutStage(TowerStage):
    key = "flowcut"

    def __init__(self, keep: float, smoothing: float = 0.5):
        self.keep, self.smoothing = keep, smoothing

    def target_tokens(self, n_image: int) -> int:
        """Language-model tokens an image of ``n_image`` keeps (at least one)."""
        return max(1, int(self.keep * n_image + 0.5))

    def expected_count(self, n_image: int) -> int:
        return self.target_tokens(n_image)

    def tower_layers(self, feature_layer: int, depth: int) -> list[int]:
        return list(range(feature_layer))  # every layer before the feature layer (rpl >= 0)

    def expected_tower_units(
        self, units: int, feature_layer: int, depth: int, entropy: float = 0.0
    ) -> list[int]:
        return flowcut_schedule(units, self.target_tokens(units), feature_layer, depth, entropy)

    def after_layer(self, ctx: TowerContext) -> torch.Tensor | None:
        if not ctx.has_cls:
            return self._after_layer_units(ctx)
        lm_tokens = ctx.patches + int(ctx.cls_in_lm)
        target = self.target_tokens(lm_tokens) - int(ctx.cls_in_lm)  # patches to keep
        relation, score = flowcut_scores(ctx.cls_probs, ctx.values, ctx.valid)
        past = ctx.scratch.get("cumulative")
        if past is None:
            past = ctx.scratch["cumulative"] = score.new_zeros(score.shape[0], ctx.patches + 1)
            current = score
        else:
            current = self.smoothing * past.gather(1, ctx.index) + (1 - self.smoothing) * score
        past.scatter_(1, ctx.index, torch.where(ctx.valid, current, past.gather(1, ctx.index)))
        rpl = ctx.feature_layer - ctx.layer - 1
        if rpl % 2:
            return None
        patches = ctx.valid.clone()
        patches[:, 0] = False
        present = patches.sum(1)
        keep_n = drop_counts(relation, present, target, rpl)
        return _top(current, patches, keep_n) | ~patches & ctx.valid

    def _after_layer_units(self, ctx: TowerContext) -> torch.Tensor | None:
        """Towers without CLS (Qwen2-VL): the mean-query global row times the value density,
        summed over each merge group, which is scored, smoothed and kept or dropped whole."""
        g = ctx.group
        b, t = ctx.valid.shape
        relation = ctx.cls_probs.mean(1) * ctx.valid  # [B, T] patches
        score = relation * ctx.values.mean(1).abs().sum(-1)
        relation = relation.view(b, t // g, g).sum(-1)
        score = score.view(b, t // g, g).sum(-1)
        units = ctx.valid[:, ::g]
        index = ctx.index[:, ::g] // g
        target = (ctx.row_patches // g).float().mul(self.keep).add(0.5).long().clamp_min(1)
        past = ctx.scratch.get("cumulative")
        if past is None:
            size = int(ctx.row_patches.max()) // g
            past = ctx.scratch["cumulative"] = score.new_zeros(b, size)
            current = score
        else:
            current = self.smoothing * past.gather(1, index) + (1 - self.smoothing) * score
        past.scatter_(1, index, torch.where(units, current, past.gather(1, index)))
        rpl = ctx.feature_layer - ctx.layer - 1
        if rpl % 2:
            return None
        keep_n = drop_counts(relation, units.sum(1), target, rpl)
        return _top(current, units, keep_n).repeat_interleave(g, dim=1)


def _top(score: torch.Tensor, candidates: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` bool: per row, its ``counts[b]`` highest-scoring candidates."""
    ranked = torch.where(candidates, score, float("-inf")).argsort(dim=1, descending=True, stable=True)
    steps = torch.arange(ranked.shape[1], device=ranked.device).expand_as(ranked)
    rank = torch.empty_like(ranked).scatter_(1, ranked, steps)
    return candidates & (rank < counts[:, None])


def flowcut_schedule(
    units: int, target: int, feature_layer: int, depth: int, entropy: float = 0.0
) -> list[int]:
    """Units (patches, or Qwen2-VL merge groups) each of ``depth`` tower layers runs on when every
    pruning layer's normalised entropy is ``entropy`` (for FLOPs estimates without weights: the
    real ``H`` is read from the image at run time). ``entropy=0`` is the most the schedule drops
    before the last pruning layer (the least tower compute), ``1`` drops nothing until then.

    Example:
        >>> flowcut_schedule(576, 64, 6, 8)  # drops after layers 1, 3, 5 (rpl 4, 2, 0)
        [576, 576, 320, 320, 139, 139, 64, 64]
    """
    n, counts = units, [units]
    for layer in range(depth - 1):
        rpl = feature_layer - layer - 1
        if 0 <= rpl and rpl % 2 == 0:
            if rpl == 0:
                n = min(n, target)
            else:
                n = max(n - round((n - target) / math.sqrt(rpl) * (1 - entropy**2)), min(n, target))
        counts.append(n)
    return counts
