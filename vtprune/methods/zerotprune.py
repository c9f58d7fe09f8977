"""Zero-TPrune: attention-graph importance, then similarity, inside the vision tower.

Wang, Dedhia and Jha, "Zero-TPrune: Zero-Shot Token Pruning through Leveraging of the Attention
Graph in Pre-Trained Transformers" (CVPR 2024). A tower stage (``vtprune.stages.TowerStage``):
after each chosen tower layer, per image,

* the layer's attention map averaged over heads, ``A = mean_h softmax(q k^T / sqrt(d))`` over
  the image's present tokens (CLS included on CLIP), is computed beside SDPA from the layer's
  own q/k projections, one image at a time and one head at a time (``vtprune.attention_graph``);
* I-stage: weighted PageRank on it, ``s <- A^T s`` for ``iterations`` steps from the uniform
  vector (a token is important when important tokens attend to it);
* S-stage: of the ``r`` tokens this step drops, the I-stage drops the ``r - r_s`` least
  important; the ``kept + r_s`` survivors, by importance, are split sequentially into an
  important half ``A`` and the rest ``B``; the ``r_s`` tokens of ``B`` whose key (mean over heads)
  is most similar (cosine) to some token of ``A`` leave.
  ``r_s = min(r, round(similarity * kept), kept - 1)``: the S-stage's share is measured against
  what is kept, so it chooses among more tokens than it drops even when ``r`` is most of the image.

``keep`` is the fraction of each image's language-model tokens that reach the language model
(all decoder layers see that many): ``k = round(keep * tokens)``, exactly. With several
``layers`` the image keeps ``round(n * (k / n) ** (i / m))`` after the ``i``-th of ``m`` (``n``
its tokens at the tower input), the last step exactly ``k``. CLS always stays in the tower and
counts among the ``k`` only with LLaVA's "full" feature strategy.

Qwen2-VL (no CLS): the graph is the image's (video frame's) patches, rotary applied as the tower
does; a 2x2 merge group's importance is the sum of its four patches' scores and its key the
mean of theirs, and whole groups are kept or dropped, so the merger still merges neighbours.

Videos on the Qwen towers (the paper has none; our choice): the tower attends within each
temporal patch (a tubelet of ``temporal_patch_size`` frames is one patch, a merge group four
patches of one tubelet) at every block, full-attention ones included, so the graph is one
tubelet's patches, the widest span the tower itself attends over (an image's is the image): a
whole-video map would rank tokens by attention between tubelets that the tower never computes.
The video keeps ``round(keep * tokens)``, split over its tubelets by their groups (cumulative
rounding, at least one group each; ``vtprune.runtime.tower_qwen``), and each tubelet's geometric
schedule runs from its groups to its share, so ``keep`` holds for the video, not per tubelet.

No official code exists (the paper's project page lists none); choices the paper leaves open or
that differ from it, all ours:

* one head-mean map per layer, as the VLM use asks for: the paper's per-head ranking with its
  "Emphasizing Informative Region" aggregation and "Variance-based Head Filter" is not done;
* a fixed number of PageRank steps (default 30), no convergence test, and no ``1/N`` factor per
  step (it scales every score alike), so batched and single-image runs agree exactly;
* the split between the stages (``similarity``, default 0.5: the S-stage drops half as many
  tokens as the step keeps; the paper prunes a few tokens per layer, where any split leaves
  ``B`` large enough, but a VLM step drops most of the image), the sequential partition (the
  paper's default), cosine of head-mean keys as the similarity, and ties broken by importance;
* the default layer: the one just before the feature layer (LLaVA: CLIP layer -3's output feeds
  the feature layer -2; Qwen2-VL: after the last block, before the merger), where the map is
  most informed; earlier ``layers`` save more tower compute. The default ``keep`` is 64/576,
  the common 64-token setting.

Qwen3-VL: as Qwen2-VL (its blocks attend per image in token order too); each DeepStack block's
features come from the groups present at that block and follow the final survivors
(``vtprune.runtime.tower_qwen3``).

LLaVA-NeXT: each crop (base image and grid crops) is a row of the tower batch
(``vtprune.runtime.tower_next``). The image keeps ``k = round(keep * N)`` patches (``N`` its
language-model tokens, newlines included: they leave once the image drops anything), split over
its crops by the patches each shows after unpadding; a crop's map and PageRank span all its
present tokens, but only the shown patches are candidates and its geometric schedule runs from
their count to its share. Patches unpadding cuts stay while the crop drops none of its shown ones
(so ``keep=1.0`` is the unpruned model) and leave with its first drop otherwise. The paper has no
multi-crop images: this split is ours (FlowCut's NeXT split, without its ``2k`` tower budget and
LLM-layer prune).

Qwen2.5-VL: as Qwen2-VL, on the tower's window-permuted patch list
(``vtprune.runtime.tower_qwen25``). Most of its blocks attend within windows only; the map is
always the whole image's, rebuilt beside the block from its own q/k (rotary applied) over every
patch of the image, whatever the block's kind: PageRank on the windowed attention itself would rank
each window on its own (a block-diagonal graph has no path between windows). On the released
models the default layer (the last block) is a full-attention block, where this map is the
block's real one. The order of the patches does not change PageRank or the two stages (ties
aside), so the kept set is the one token order gives.

LLaVA-OneVision (``vtprune.runtime.tower_onevision``): each SigLIP crop (base image, tiles) and
each video frame is a row of the tower batch, as on LLaVA-NeXT but without CLS: a row's map and
PageRank span its present patches, so a video frame's map is that frame's own attention (SigLIP
attends within a frame; no map spans frames, nor crops). The image (clip) keeps
``k = round(keep * N)`` patches (``N`` its language-model tokens, newlines included), split over
its crops (frames) by the tokens whose heaviest patch each holds, FlowCut's OneVision split. The
paper has no multi-crop images nor resampled tokens; the rule for those, ours and the runner's
(shared with FlowCut): ``anyres_max`` downscaling and video pooling make a token a bilinear mix of
up to four patches; only each token's heaviest patch is a candidate, ranked by its own PageRank
score and key (not a mix of its taps'), and the token is kept iff that patch survives; its other
patches stay while the crop drops none of its candidates and leave with its first drop, and a
kept token's feature mixes its surviving patches only, weights renormalised.

Supported on LLaVA-1.5, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL, Qwen3-VL and LLaVA-OneVision.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vtprune.attention_graph import (
    DEFAULT_ITERATIONS,
    head_mean_attention,
    importance_then_similarity,
    weighted_pagerank,
)
from vtprune.config import MethodConfig, ModelInfo, _invalid, check_int, check_layer_list, register_method
from vtprune.stages import TowerContext, TowerStage

DEFAULT_KEEP = 64 / 576


@register_method("zerotprune")
@dataclass
class ZeroTPrune(MethodConfig):
    """Zero-TPrune (Wang et al., 2024): weighted PageRank importance and similarity pruning in
    the vision tower.

    Args:
        keep: fraction of each image's tokens that reach the language model (default 64/576).
        layers: tower layers after which tokens leave (default: the one before the feature
            layer); a strictly increasing list of integers >= 0.
        iterations: weighted PageRank steps (default 30), an integer >= 1.
        similarity: tokens the S-stage drops at a step, as a share of the tokens the step
            keeps (default 0.5; 0 is the I-stage alone; at most all but one of the kept), a
            number in [0, 1].

    Example:
        >>> ZeroTPrune(keep=0.25).iterations, ZeroTPrune().similarity
        (30, 0.5)
    """

    layers: list[int] | None = None
    iterations: int = DEFAULT_ITERATIONS
    similarity: float = 0.5

    @classmethod
    def tune_space(cls, info: ModelInfo, keep: float) -> dict[str, list]:
        """The S-stage's share and the PageRank steps for ``vtprune.tune``."""
        return {"similarity": [0.0, 0.25, 0.5, 1.0], "iterations": [10, 30]}

    def validate(self) -> None:
        if self.layers is not None:
            check_layer_list(self.name, "layers", self.layers, minimum=0, increasing=True)
        check_int(self.name, "iterations", self.iterations, minimum=1)
        ok = isinstance(self.similarity, (int, float)) and not isinstance(self.similarity, bool)
        if not ok or not 0 <= self.similarity <= 1:
            raise _invalid(self.name, "similarity", self.similarity, "a number in [0, 1]")

    def stages(self, info: ModelInfo) -> list:
        keep = DEFAULT_KEEP if self.keep is None else self.keep
        layers = None if self.layers is None else list(self.layers)
        return [ZeroTPruneStage(keep, layers, self.iterations, float(self.similarity))]


def step_count(n: int, target: int, step: int, steps: int) -> int:
    """Tokens left after pruning step ``step`` of ``steps`` (1-based): geometric from ``n`` to
    ``target``, exactly ``target`` at the last step.

    Example:
        >>> [step_count(64, 16, i, 2) for i in (1, 2)]
        [32, 16]
    """
    if step >= steps or n <= target:
        return min(n, target)
    return max(target, min(n, int(n * (target / n) ** (step / steps) + 0.5)))


class ZeroTPruneStage(TowerStage):
    key = "zerotprune"
    needs_queries = True
    families = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_onevision")

    def __init__(self, keep: float, layers: list[int] | None, iterations: int, similarity: float):
        self.keep, self.layers, self.iterations, self.similarity = keep, layers, iterations, similarity
        self._steps: list[int] = []

    def expected_count(self, n_image: int) -> int:
        return max(1, int(self.keep * n_image + 0.5))

    def crop_budget(self, n_image: int, n_patches: int) -> int:
        """Patches an image of ``n_image`` language-model tokens (``n_patches`` of them patches,
        the rest LLaVA-NeXT's newlines) keeps, split by the runner over its crops."""
        return min(n_patches, self.expected_count(n_image))

    def tower_layers(self, feature_layer: int, depth: int) -> list[int]:
        self._steps = self.step_layers(feature_layer)
        return self._steps

    def step_layers(self, feature_layer: int) -> list[int]:
        """Tower layers after which tokens leave, checked against the feature layer."""
        if self.layers is None:
            return [feature_layer - 1] if feature_layer > 0 else []
        bad = [x for x in self.layers if x >= feature_layer]
        if bad:
            raise ValueError(
                f"zerotprune: option 'layers'={self.layers!r} is out of range; allowed: tower "
                f"layers 0..{feature_layer - 1} (before the feature layer {feature_layer})"
            )
        return list(self.layers)

    def expected_tower_units(
        self, units: int, feature_layer: int, depth: int, entropy: float = 0.0
    ) -> list[int]:
        """Units each tower layer runs on: the geometric steps of :func:`step_count` after each of
        ``layers`` (the schedule does not depend on the image, so ``entropy`` is unused).

        Example:
            >>> ZeroTPruneStage(0.25, [1, 3], 30, 0.5).expected_tower_units(64, 6, 8)
            [64, 64, 32, 32, 16, 16, 16, 16]
        """
        steps = self.step_layers(feature_layer)
        target = min(units, self.expected_count(units))
        n, counts = units, []
        for layer in range(depth):
            counts.append(n)
            if layer in steps:
                n = step_count(units, target, steps.index(layer) + 1, len(steps))
        return counts

    def after_layer(self, ctx: TowerContext) -> torch.Tensor:
        step = self._steps.index(ctx.layer) + 1
        g = ctx.group
        keep = torch.zeros_like(ctx.valid)
        for b in range(ctx.valid.shape[0]):
            slots = torch.nonzero(ctx.valid[b]).flatten()
            attn = head_mean_attention(ctx.queries[b][:, slots], ctx.keys[b][:, slots], ctx.scale)
            scores = weighted_pagerank(attn, self.iterations)
            keys = ctx.keys[b][:, slots].mean(0)  # [n, d], mean over heads
            hidden = None  # patches no language-model token shows (unpadding, resampling)
            if ctx.candidates is not None:  # a CLIP/SigLIP crop or frame: the runner split the budget
                lead = int(ctx.has_cls)  # CLIP crops (LLaVA-NeXT): slot 0 is CLS and stays
                keep[b, :lead] = True
                shown = ctx.candidates[b][slots[lead:]]
                if "shown" not in ctx.scratch:  # the crops' candidates at the tower input
                    ctx.scratch["shown"] = (ctx.candidates & ctx.valid).sum(1).tolist()
                n0, target = ctx.scratch["shown"][b], int(ctx.row_target[b])
                cand, hidden = slots[lead:][shown], slots[lead:][~shown]
                scores, keys = scores[lead:][shown], keys[lead:][shown]
            elif ctx.has_cls:  # slot 0 is CLS: it stays and is no candidate
                lm = ctx.patches + int(ctx.cls_in_lm)
                target = self.expected_count(lm) - int(ctx.cls_in_lm)
                n0, cand = ctx.patches, slots[1:]
                scores, keys = scores[1:], keys[1:]
                keep[b, 0] = True
            else:  # whole merge groups: summed scores, mean keys
                n0 = int(ctx.row_patches[b]) // g
                # a video's frames share its budget (the runner's split); an image's row is all of it
                target = self.expected_count(n0) if ctx.row_target is None else int(ctx.row_target[b]) // g
                cand = slots[::g]
                scores = scores.view(-1, g).sum(1)
                keys = keys.view(-1, g, keys.shape[-1]).mean(1)
            count = step_count(n0, target, step, len(self._steps))
            chosen = importance_then_similarity(scores, keys, count, self.similarity)
            for j in range(g):
                keep[b, cand[chosen] + j] = True
            if hidden is not None and count >= cand.numel():
                # the crop drops nothing it shows: the cut patches stay too (keep=1.0 is the
                # unpruned tower); otherwise they leave with its first drop
                keep[b, hidden] = True
        return keep
