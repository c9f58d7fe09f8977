"""SparseVLM: rater text tokens rank the visual tokens inside the language model.

Zhang et al., "SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model
Inference" (ICML 2025), as the official v1.5 code does it:

* **Raters**, once per prompt, from the language model's input embeddings: with ``V`` the visual
  and ``T`` the text embeddings, ``M = softmax over text of V T^T`` (no scaling), ``w_t`` the mean
  of ``M``'s column ``t`` over the visual tokens, and the raters ``R = {t : w_t > mean(w)}``.
  Text = the row's valid non-visual tokens after its first visual token (the official code has
  one image and takes everything after it). Per row of a padded batch (padding is neither
  visual nor text). A row without text after its image rates with its last token.
* **Pruning** after each layer of ``layers`` (official ``pruning_loc = [2, 6, 15]``): relevance
  of visual token ``j`` = mean over raters and heads of that layer's attention probability
  ``A[t, j]``; the top ``n_l`` visual tokens stay, the others leave from the next layer on
  (so layers ``0..2`` see every token). Here the raters' rows are recomputed beside SDPA from
  the layer's own q/k projections (``vtprune.scoring.projected_query_probs``), never the full
  ``L x L`` matrix the official code builds at these layers.
* **Recycling** (``recycle=True``, v1.5): of the tokens a stage prunes, the top 30% (+1) by
  relevance are clustered with DPC-kNN (``vtprune.clustering.dpc_knn``) into ``m // 10 + 1``
  clusters on that layer's output hidden states, and each cluster's mean goes on. Deviation: the
  official code inserts these means as new tokens after the kept visual tokens; vtprune cannot
  add sequence slots inside the model, so each mean replaces the hidden state of its cluster's
  density-peak centre, a real pruned token that is kept with its original position.

Schedules and ``keep``:

* ``budget=64|96|128|192`` runs the official v1.5 per-layer counts (``[66, 30, 17]``,
  ``[238, 48, 26]``, ``[303, 110, 36]``, ``[300, 200, 110]`` of 576), scaled to each row's visual
  count ``N`` as ``round(n_l * N / 576)``; recycled clusters come on top, as in the official code.
* ``keep`` (layer-average fraction, recycled tokens included) takes the shape of the official
  schedule whose own layer average on this model is nearest, and scales all its counts by one
  factor (each capped at ``N``), solved by bisection so the layer average equals ``keep``. With
  ``recycle=True`` each stage keeps ``n`` tokens by relevance such that ``n`` plus its clusters
  is the stage's count.
* Shallower models: the layers that first see a pruned set (official ``[3, 7, 16]`` of 32) are
  scaled to the depth by ``vtprune.selection.scale_layers`` (as PyramidDrop's boundaries), so
  ``layers`` reads ``[b - 1 for b in scaled]``.

Kept tokens keep their original (M-RoPE) positions (the official LLaVA code re-indexes them
contiguously). The official top-k never keeps all ``N`` tokens (``min(n, N - 1)``); here a count
of ``N`` keeps everything, so ``keep=1.0`` is the unpruned model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vtprune.clustering import dpc_knn
from vtprune.config import (
    MethodConfig,
    ModelInfo,
    check_bool,
    check_layer_list,
    register_method,
)
from vtprune.scoring import projected_query_probs
from vtprune.search import increasing_lists, layer_candidates
from vtprune.selection import (
    count_for_fraction,
    fit_schedule,
    scale_layers,
    schedule_average,
    slots_of,
    topk_mask,
)
from vtprune.stages import LMInput, PrefillContext, PrefillStage

REFERENCE_TOKENS = 576
SCHEDULES = {  # official v1.5 counts kept after layers 2, 6 and 15 of 576 visual tokens
    64: (66, 30, 17),
    96: (238, 48, 26),
    128: (303, 110, 36),
    192: (300, 200, 110),
}
DEFAULT_LAYERS = [2, 6, 15]  # pruning_loc: the layers whose attention rates the tokens
DEFAULT_BUDGET = 64


@register_method("sparsevlm")
@dataclass
class SparseVLM(MethodConfig):
    """SparseVLM v1.5 (Zhang et al., 2025): rater-guided pruning at three LLM layers.

    Args:
        keep: target layer-average fraction (recycled tokens included); scales the nearest
            official schedule to it. Give ``keep`` or ``budget``, not both.
        budget: 64, 96, 128 or 192: the official per-layer schedule (default 64 when no ``keep``).
        layers: the layers whose attention rates the visual tokens; tokens leave after each
            (default ``[2, 6, 15]`` for 32 layers, scaled to the depth).
        recycle: cluster and merge the most relevant pruned tokens (v1.5), default False.

    Example:
        >>> layers, fractions = SparseVLM(keep=0.25).resolve(ModelInfo(num_layers=32, family="llava"))
        >>> layers, [round(f * 576) for f in fractions]
        ([2, 6, 15], [314, 114, 37])
    """

    budget: int | None = None
    layers: list[int] | None = None
    recycle: bool = False

    def validate(self) -> None:
        if self.budget is not None:
            if type(self.budget) is not int or self.budget not in SCHEDULES:  # 64.0 == 64: refuse floats
                allowed = ", ".join(map(str, SCHEDULES))
                raise ValueError(f"sparsevlm: option 'budget'={self.budget!r} is invalid; allowed: {allowed}")
            if self.keep is not None:
                raise ValueError("sparsevlm: give either 'keep' or 'budget', not both")
        if self.layers is not None:
            check_layer_list(self.name, "layers", self.layers, minimum=0, increasing=True)
            if len(self.layers) != 3:
                raise ValueError(
                    f"sparsevlm: option 'layers'={self.layers!r} must list three layers (one per schedule count)"
                )
        check_bool(self.name, "recycle", self.recycle)

    @classmethod
    def tune_space(cls, info: ModelInfo, keep: float) -> dict[str, list]:
        """The three rating layers for ``vtprune.tune`` (tokens leave after each: the first must
        come early enough for ``keep``)."""
        cands = layer_candidates(info.num_layers, first=0)
        lists = increasing_lists([x for x in cands if x <= info.num_layers - 2], (3,))
        return {"layers": [x for x in lists if x[0] + 1 < keep * info.num_layers], "recycle": [False, True]}

    def boundaries(self, info: ModelInfo) -> list[int]:
        """The first layer that sees each stage's pruned set (``layers`` + 1)."""
        n = info.num_layers
        if self.layers is None:
            bounds = scale_layers([x + 1 for x in DEFAULT_LAYERS], n)
            if len(bounds) < 3:
                raise ValueError(f"sparsevlm: a {n}-layer decoder is too shallow for three pruning layers")
            return bounds
        for layer in self.layers:
            if layer + 1 > n - 1:
                raise ValueError(
                    f"sparsevlm: option 'layers'={self.layers!r} is out of range; allowed: integers in "
                    f"0..{n - 2} for this {n}-layer decoder"
                )
        return [x + 1 for x in self.layers]

    def resolve(self, info: ModelInfo) -> tuple[list[int], list[float]]:
        """The rating layers and the fraction of N each stage leaves (recycled tokens included
        under ``keep``)."""
        bounds = self.boundaries(info)
        layers = [b - 1 for b in bounds]
        if self.keep is None:
            budget = DEFAULT_BUDGET if self.budget is None else self.budget
            return layers, [c / REFERENCE_TOKENS for c in SCHEDULES[budget]]
        n = info.num_layers
        if self.keep <= bounds[0] / n:
            raise ValueError(
                f"sparsevlm: keep={self.keep} is unreachable with layers={layers} on {n} layers (layers up "
                f"to the first rating layer keep everything: keep must exceed {bounds[0] / n:.4f}); "
                "use earlier 'layers'"
            )
        shapes = [[min(1.0, c / REFERENCE_TOKENS) for c in counts] for counts in SCHEDULES.values()]
        shape = min(shapes, key=lambda f: abs(schedule_average(bounds, f, n) - self.keep))
        return layers, fit_schedule(bounds, shape, self.keep, n)

    def stages(self, info: ModelInfo) -> list:
        layers, fractions = self.resolve(info)
        counted = self.keep is not None  # under keep, clusters count towards each stage's share
        return [SparseVLMStage(layer + 1, f, self.recycle, counted) for layer, f in zip(layers, fractions)]


def recycled_clusters(pruned: int) -> int:
    """Clusters SparseVLM v1.5 makes from ``pruned`` tokens: ``m // 10 + 1``, ``m = int(0.3 p) + 1``.

    Example:
        >>> recycled_clusters(0), recycled_clusters(10), recycled_clusters(510)
        (0, 1, 16)
    """
    if pruned <= 0:
        return 0
    return (int(pruned * 0.3) + 1) // 10 + 1


def rater_mask(lm: LMInput) -> torch.Tensor:
    """``[B, L0]`` the rater text tokens of each row (slots of ``lm.embeds``).

    Example:
        >>> e = torch.tensor([[[1.0, 0], [0, 1.0], [2.0, 0], [0, 2.0], [0.1, 0.1]]])
        >>> vis = torch.tensor([[False, True, True, False, False]])
        >>> lm = LMInput(e, vis, torch.ones_like(vis), torch.arange(5)[None])
        >>> rater_mask(lm).tolist()  # the text token most aligned with the image rates it
        [[False, False, False, True, False]]
    """
    visual, valid = lm.visual, lm.valid
    text = visual.long().cummax(1).values.bool() & ~visual & valid
    vs, ts = slots_of(visual), slots_of(text)
    gather = lambda s: lm.embeds.gather(1, s.clamp(min=0).unsqueeze(-1).expand(-1, -1, lm.embeds.shape[-1]))  # noqa: E731
    logits = gather(vs).float() @ gather(ts).float().transpose(1, 2)  # [B, V, T]
    tvalid, vvalid = (ts >= 0).unsqueeze(1), (vs >= 0).unsqueeze(2)
    m = logits.masked_fill(~tvalid, float("-inf")).softmax(-1).masked_fill(~vvalid, 0).nan_to_num(0)
    w = m.sum(1) / vvalid.sum(1).clamp(min=1)  # [B, T]
    mean = (w * tvalid[:, 0]).sum(1, keepdim=True) / tvalid[:, 0].sum(1, keepdim=True).clamp(min=1)
    raters = (w > mean) & tvalid[:, 0]
    out = torch.zeros(visual.shape[0], visual.shape[1] + 1, dtype=torch.bool, device=visual.device)
    out.scatter_(1, torch.where(ts >= 0, ts, visual.shape[1]), raters)  # padding: a spare column
    return out[:, :-1]


class SparseVLMStage(PrefillStage):
    """Drops visual tokens before layer ``layer`` by the raters' attention at layer ``layer - 1``."""

    needs_previous_input = True
    needs_lm_input = True

    def __init__(self, layer: int, fraction: float, recycle: bool, counted: bool):
        self.layer, self.fraction, self.recycle, self.counted = layer, fraction, recycle, counted
        self.key = f"sparsevlm@{layer}"

    def _split(self, target: int, n_current: int) -> tuple[int, int]:
        """(kept by relevance, recycled clusters) for a stage count ``target`` of ``n_current``."""
        target = min(target, n_current)
        if not self.recycle:
            return target, 0
        if not self.counted:
            return target, recycled_clusters(n_current - target)
        n = target
        for _ in range(3):  # clusters grow slowly with the pruned count: a few steps settle it
            n = max(0, target - recycled_clusters(n_current - n))
        return n, recycled_clusters(n_current - n)

    def expected_count(self, n_in: int, n_current: int) -> int:
        target = int(count_for_fraction(torch.tensor([n_in]), self.fraction))
        return min(n_current, sum(self._split(target, n_current)))

    def select(self, ctx: PrefillContext) -> torch.Tensor:
        lm = ctx.lm_input
        raters0 = rater_mask(lm)
        raters = raters0.gather(1, lm.slots.clamp(min=0)) & (lm.slots >= 0)
        # a row with no text after its image rates with its last token
        raters |= ~raters.any(1, keepdim=True) & (
            torch.arange(raters.shape[1], device=raters.device) == ctx.query_slot.unsqueeze(1)
        )
        queries = slots_of(raters)
        prev = ctx.layers[self.layer - 1]
        probs = projected_query_probs(prev.self_attn, *ctx.previous_qk, ctx.cos, ctx.sin, ctx.valid, queries)
        scores = probs.sum(1) / (queries >= 0).sum(1, keepdim=True).clamp(min=1)
        targets = count_for_fraction(ctx.visual_in, self.fraction)
        n_current = ctx.visual.sum(1)
        if not self.recycle:
            return topk_mask(scores, ctx.visual, targets.minimum(n_current))
        splits = [self._split(int(t), int(c)) for t, c in zip(targets.tolist(), n_current.tolist())]
        kept = topk_mask(scores, ctx.visual, torch.tensor([s[0] for s in splits], device=scores.device))
        for b in range(kept.shape[0]):
            self._recycle(ctx, b, scores[b], kept[b], splits[b][1])
        return kept

    def _recycle(self, ctx: PrefillContext, b: int, scores, kept, n_clusters: int) -> None:
        """Cluster the most relevant pruned tokens of row ``b``; keep each centre, merged."""
        pruned = torch.nonzero(ctx.visual[b] & ~kept).flatten()
        if n_clusters == 0 or pruned.numel() == 0:
            return
        m = int(pruned.numel() * 0.3) + 1
        order = torch.sort(scores[pruned].float(), descending=True, stable=True).indices[:m]
        cand = pruned[order]  # by decreasing relevance, as the official code orders them
        centres, labels = dpc_knn(ctx.hidden[b, cand], n_clusters)
        kept[cand[centres]] = True
        ctx.merge(b, cand, cand[centres][labels])
