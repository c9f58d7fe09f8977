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
* each image is scored, scheduled and given ``round(keep * tokens)`` on its own, over its own
  patches (the port is batch size 1 and takes the mean over the whole tower input);
* a video (no official rule): the tower attends per temporal patch (a tubelet of
  ``temporal_patch_size`` frames is one patch, a merge group four patches of one tubelet), so
  each tubelet is scored and scheduled as an image is, with its global row over its own patches;
  the video keeps ``round(keep * tokens)``, split over its tubelets by their groups (cumulative
  rounding, at least one group each; ``vtprune.runtime.tower_qwen``), not a rounding per tubelet;
* the tower goes straight to ``k`` tokens: the port keeps ``4k`` patches (``k`` merged tokens'
  worth of them, broken groups aside) and prunes to ``k`` again at LLM layer 1, not done here.

Qwen2.5-VL: as Qwen2-VL, in the tower's window-permuted order (``vtprune.runtime.tower_qwen25``
rebuilds the window and image boundaries from the survivors); at window blocks the global row
still spans the whole image (it is computed beside the block, not read from its windowed attention).

LLaVA-NeXT (the official anyres recipe: the tower keeps about twice the final count, then a second
prune at LLM layer 1). Each crop (base image and grid crops) is a row of the tower batch
(``vtprune.runtime.tower_next``). Unlike the code:

* the image's tower budget is ``2k`` patches (``k = round(keep * N * L / (L + 2))``, ``N`` its
  language-model tokens, newlines included), split over its crops by the patches each shows after
  unpadding; the code keeps ``k/2`` patches per crop whatever unpadding later cuts. Patches cut by
  unpadding are not candidates: the drop counts are over the shown ones (entropy still over all
  present patches) and the others leave with the crop's first drop;
* newlines are dropped once the image drops any patch (the code drops them for multi-crop
  images) and all kept when it drops none, so ``keep=1.0`` is the unpruned model;
* the layer-1 prune (before decoder layer 2, scored with layer 1's q/k/v: the last token's
  relation over the visual keys plus its value similarity over the visual values, times the value
  L1 density) reads the row's last token (the code: the last instruction token), ranks each row's
  visual tokens together, and keeps ``round((keep * L * N - 2M) / (L - 2))`` of them (``M`` left by
  the tower), so the layer average is ``keep``; the code keeps ``target_num``. Composed with a
  vision stage that kept a share of the tower's survivors, it keeps that share of this count, so
  the layer average is the product of the two ``keep`` (no official counterpart).

Qwen3-VL: as Qwen2-VL; each DeepStack block's features come from the patches present at that
block and follow the final survivors (``vtprune.runtime.tower_qwen3``).

LLaVA-OneVision (no official port): each SigLIP crop (base image, tiles) and video frame is a row
of the tower batch, as on LLaVA-NeXT (``vtprune.runtime.tower_onevision``). With no CLS the row is
Qwen2-VL's global one (mean query of the crop's patches, times the value density, no semantic
term), over single patches (no merge groups); the schedule runs up to the feature layer. The
image's (video's) budget is ``round(keep * N)`` patches (``N`` its language-model tokens, newlines
included; no second prune in the LLM), split over its crops (frames) by the tokens each holds;
newlines follow LLaVA-NeXT's rule. ``anyres_max`` downscaling and the video's 2x2 bilinear pooling
make a token a mix of up to four tower patches (its taps); the rule chosen:

* a resampled token is kept iff its heaviest tap survives (each token has its own heaviest tap,
  so the kept count is the survivors' count and ``keep`` holds); only heaviest taps are
  candidates, the other taps leave with their crop's first drop (as patches cut by unpadding);
* its feature is the bilinear mix over its surviving taps, weights renormalised to sum to 1, so a
  dropped patch is neither mixed in as zeros nor shrinks the feature (a pooled video token of a
  pruned clip is then mostly its heaviest patch). Without resampling every token is one patch and
  its feature is that survivor's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vtprune.config import MethodConfig, ModelInfo, _invalid, register_method
from vtprune.scoring import apply_rope
from vtprune.selection import topk_mask
from vtprune.stages import PrefillContext, PrefillStage, TowerContext, TowerStage

DEFAULT_KEEP = 64 / 576  # the official default target_num=64 on LLaVA-1.5
#: LLaVA-NeXT: the decoder layer before which the second prune acts (scored with layer 1's
#: attention, as the official ``prune_layer = 1``: layers 0 and 1 see the tower's survivors)
LM_LAYER = 2


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

    @classmethod
    def tune_space(cls, info: ModelInfo, keep: float) -> dict[str, list]:
        """The cross-layer smoothing weight for ``vtprune.tune`` (FlowCut's only other option)."""
        return {"smoothing": [0.0, 0.25, 0.5, 0.75, 0.9]}

    def validate(self) -> None:
        ok = isinstance(self.smoothing, (int, float)) and not isinstance(self.smoothing, bool)
        if not ok or not 0 <= self.smoothing < 1:
            raise _invalid(self.name, "smoothing", self.smoothing, "a number in [0, 1)")

    def stages(self, info: ModelInfo) -> list:
        keep = DEFAULT_KEEP if self.keep is None else self.keep
        if info.family == "llava_next" and info.num_layers > LM_LAYER:
            # the official anyres recipe: the tower keeps twice the final count, LLM layer 1 the rest
            return [
                FlowCutStage(keep, float(self.smoothing), num_layers=info.num_layers, lm_layer=LM_LAYER),
                FlowCutLLMStage(keep, LM_LAYER, info.num_layers),
            ]
        return [FlowCutStage(keep, float(self.smoothing))]


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


def drop_counts(
    relation: torch.Tensor, present: torch.Tensor, target, rpl: int, support: torch.Tensor | None = None
) -> torch.Tensor:
    """Patches each image keeps after a pruning layer with ``rpl`` pruning layers' worth left.

    ``present`` ``[B]`` counts the patches now; the image drops
    ``round((n - target) / sqrt(rpl) * (1 - H^2))`` (``H``: entropy of ``relation`` over
    ``log`` of the ``support`` patches ``relation`` spreads over, by default ``n``), never below
    ``target`` (an int or ``[B]``); ``rpl == 0`` goes straight to ``target``.

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
    m = n if support is None else support.float()
    entropy = -torch.xlogy(relation, relation).sum(1)
    ratio = torch.where(m > 1, entropy / m.clamp_min(2).log(), torch.ones_like(m))
    r = torch.round((n - target) / math.sqrt(rpl) * (1 - ratio**2))
    return torch.maximum(present - r.long(), target).minimum(present)


class FlowCutStage(TowerStage):
    key = "flowcut"

    def __init__(self, keep: float, smoothing: float = 0.5, num_layers: int = 0, lm_layer: int | None = None):
        self.keep, self.smoothing = keep, smoothing
        self.num_layers, self.lm_layer = num_layers, lm_layer

    def target_tokens(self, n_image: int) -> int:
        """Language-model tokens an image of ``n_image`` keeps (at least one)."""
        if self.lm_layer is not None:
            # layers before ``lm_layer`` see 2k, the rest k: solve the layer average for k
            n, layer = self.num_layers, self.lm_layer
            return 2 * max(1, int(self.keep * n_image * n / (n + layer) + 0.5))
        return max(1, int(self.keep * n_image + 0.5))

    def crop_budget(self, n_image: int, n_patches: int) -> int:
        """Patches of an image of ``n_image`` language-model tokens (``n_patches`` of them patches,
        the rest newlines) that leave the tower (LLaVA-NeXT: split over its crops)."""
        return min(n_patches, self.target_tokens(n_image))

    def expected_count(self, n_image: int) -> int:
        return min(n_image, self.target_tokens(n_image))

    def tower_layers(self, feature_layer: int, depth: int) -> list[int]:
        return list(range(feature_layer))  # every layer before the feature layer (rpl >= 0)

    def expected_tower_units(
        self, units: int, feature_layer: int, depth: int, entropy: float = 0.0
    ) -> list[int]:
        return flowcut_schedule(units, self.target_tokens(units), feature_layer, depth, entropy)

    def after_layer(self, ctx: TowerContext) -> torch.Tensor | None:
        if not ctx.has_cls and ctx.group > 1:  # Qwen merge groups (OneVision: single patches)
            return self._after_layer_units(ctx)
        if ctx.row_target is not None:  # crops of larger images: the runner split the budget
            target = ctx.row_target
        else:
            target = self.target_tokens(ctx.patches + int(ctx.cls_in_lm)) - int(ctx.cls_in_lm)
        if ctx.has_cls:
            relation, score = flowcut_scores(ctx.cls_probs, ctx.values, ctx.valid)
        else:  # SigLIP crops (LLaVA-OneVision): the global row and the density, as on Qwen2-VL
            relation = ctx.cls_probs.mean(1) * ctx.valid
            score = relation * ctx.values.mean(1).abs().sum(-1)
        past = ctx.scratch.get("cumulative")
        if past is None:
            size = ctx.patches + int(ctx.has_cls)
            past = ctx.scratch["cumulative"] = score.new_zeros(score.shape[0], size)
            current = score
        else:
            current = self.smoothing * past.gather(1, ctx.index) + (1 - self.smoothing) * score
        past.scatter_(1, ctx.index, torch.where(ctx.valid, current, past.gather(1, ctx.index)))
        rpl = ctx.feature_layer - ctx.layer - 1
        if rpl % 2:
            return None
        patches = ctx.valid.clone()
        if ctx.has_cls:
            patches[:, 0] = False
        if ctx.candidates is None:
            keep_n = drop_counts(relation, patches.sum(1), target, rpl)
            return _top(current, patches, keep_n) | ~patches & ctx.valid
        # only patches the language model will show count; the others (cut by unpadding) leave
        # with the crop's first drop
        shown = patches & ctx.candidates
        present = shown.sum(1)
        keep_n = drop_counts(relation, present, target, rpl, support=patches.sum(1))
        hidden = patches & ~shown & (keep_n >= present)[:, None]
        return _top(current, shown, keep_n) | hidden | ~patches & ctx.valid

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
        if ctx.row_target is not None:  # the runner split an image's (video's) budget over its rows
            target = ctx.row_target // g
        else:
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


@torch.no_grad()
def flowcut_llm_scores(attn, q_out, k_out, v_out, cos, sin, visual, query_slot) -> torch.Tensor:
    """FlowCut's decoder-side score ``[B, L]`` of every visual slot (0 elsewhere).

    From one decoder layer's own projection outputs (``q_out [B, L, H*d]``, ``k_out`` /
    ``v_out [B, L, H_kv*d]``) and rotary tables at the slots, with the row's query token
    (``query_slot [B]``): relation = mean over heads of the query's softmax over the *visual*
    keys, semantic = mean over heads of ``softmax(v_query . v_j / sqrt(d))`` over the visual
    values, density = ``|| mean_h v_j ||_1``; score ``(relation + semantic) * density``. Key/value
    heads shared by several query heads (GQA) count once per query head in the relation and
    once each in the semantic term (repeating them would not change a mean).

    Example:
        >>> from types import SimpleNamespace
        >>> attn = SimpleNamespace(head_dim=2, scaling=2**-0.5)
        >>> q = torch.tensor([[[0.0, 0.0], [0.0, 0.0], [1.0, 0.0]]])
        >>> k = torch.tensor([[[1.0, 0.0], [-1.0, 0.0], [0.0, 0.0]]])
        >>> v = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]])
        >>> ones, zeros = torch.ones(1, 3, 2), torch.zeros(1, 3, 2)
        >>> visual = torch.tensor([[True, True, False]])
        >>> s = flowcut_llm_scores(attn, q, k, v, ones, zeros, visual, torch.tensor([2]))
        >>> bool(s[0, 0] > s[0, 1]), float(s[0, 2])
        (True, 0.0)
    """
    b, n, _ = k_out.shape
    hd = attn.head_dim
    rows = torch.arange(b, device=k_out.device)
    cos, sin = cos.expand(b, -1, -1).float(), sin.expand(b, -1, -1).float()
    q = q_out[rows, query_slot].float().view(b, -1, 1, hd)  # [B, H, 1, d]
    q = apply_rope(q, cos[rows, query_slot].unsqueeze(1), sin[rows, query_slot].unsqueeze(1))
    k = apply_rope(k_out.float().view(b, n, -1, hd).transpose(1, 2), cos, sin)  # [B, Hkv, L, d]
    v = v_out.float().view(b, n, -1, hd).transpose(1, 2)
    q = q.view(b, k.shape[1], -1, hd)  # query heads grouped by their key/value head
    hidden = ~visual[:, None, None, :]
    relation = torch.softmax(
        ((q @ k.transpose(-1, -2)) * attn.scaling).masked_fill(hidden, float("-inf")), -1
    )
    v_query = v[rows, :, query_slot].unsqueeze(2)  # [B, Hkv, 1, d]
    semantic = torch.softmax(
        ((v_query @ v.transpose(-1, -2)) * hd**-0.5).masked_fill(hidden, float("-inf")), -1
    )
    score = (relation.mean((1, 2)) + semantic.mean((1, 2))) * v.mean(1).abs().sum(-1)
    return torch.where(visual, score, 0.0)


class FlowCutLLMStage(PrefillStage):
    """LLaVA-NeXT's second FlowCut prune: before decoder layer ``layer``, scored with the
    attention of layer ``layer - 1`` (the official ``prune_layer = 1``).

    Each row keeps ``round((keep * L * N - layer * M) / (L - layer))`` visual tokens (``N`` in
    the prompt, ``M`` left by the tower), so the layer average is ``keep`` whatever the tower's
    rounding, unpadding and newlines left; after a vision stage that kept a share of the tower's
    survivors (``PrefillContext.visual_tower``), the same share of that count.
    """

    needs_previous_input = True
    needs_previous_values = True

    def __init__(self, keep: float, layer: int, num_layers: int):
        self.keep, self.layer, self.num_layers = keep, layer, num_layers
        self.key = f"flowcut@{layer}"

    def counts(self, n_prompt: torch.Tensor, n_in: torch.Tensor) -> torch.Tensor:
        """Visual tokens each row keeps from ``layer`` on (``n_prompt`` in the prompt, ``n_in`` at the LM input)."""
        n, layer = self.num_layers, self.layer
        k = torch.floor((self.keep * n * n_prompt.double() - layer * n_in.double()) / (n - layer) + 0.5)
        return k.long().clamp(min=1).minimum(n_in)

    def expected_count(self, n_in: int, n_current: int) -> int:
        # without a run the prompt's N is not known here: the tower kept 2k of it unless keep is high
        n, layer = self.num_layers, self.layer
        if 2 * self.keep * n < n + layer:
            return min(n_current, (n_in + 1) // 2)
        return min(n_current, int(self.counts(torch.tensor(n_in), torch.tensor(n_in))))

    def select(self, ctx: PrefillContext) -> torch.Tensor:
        attn = ctx.layers[self.layer - 1].self_attn
        q_out, k_out = ctx.previous_qk
        scores = flowcut_llm_scores(
            attn, q_out, k_out, ctx.previous_v, ctx.cos, ctx.sin, ctx.visual, ctx.query_slot
        )
        n_in = ctx.visual_in
        tower = n_in if ctx.visual_tower is None else ctx.visual_tower
        k = self.counts(ctx.visual_prompt, tower)
        # vision stages composed after the tower kept a share of its survivors: keep the same
        # share of FlowCut's own count (exactly k when they kept all), so the average is their product
        k = torch.div(2 * k * n_in + tower, 2 * tower.clamp(min=1), rounding_mode="floor")
        return topk_mask(scores, ctx.visual, k.minimum(ctx.visual.sum(1)))


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
