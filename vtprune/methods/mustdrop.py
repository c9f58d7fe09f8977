"""MustDrop: merge at the vision stage, filter at prefill, re-index the KV cache for decoding.

* Vision: each image grid is cut into ``window x window`` tiles; a tile whose mean pairwise
  cosine similarity (self-pairs excluded) of tower features after layer 0 reaches
  ``merge_threshold`` becomes one token (the mean of the tile, at the tile's centre, keeping
  spatial order). The key set, the top ``ceil(key_ratio * (N - 1))`` tokens by CLS attention
  (mean over heads) at the last tower layer, is never merged or dropped later.
* Prefill: at the configured layers (default [2, 6, 10, 14] of 32, scaled) the layer's own
  attention from every text token after the image onto the visual tokens (mean over heads)
  is read; a token goes when its summed attention is below ``global_thr`` x the total AND its
  largest single attention is below ``individual_thr``. The tokens then leave from the next
  layer on.
* Decode: after prefill, the KV caches of the layers from the first prefill layer on are
  re-indexed to the final surviving set, so decoding attends only to survivors.

``keep`` (instead of thresholds) scales both thresholds per request and stage by bisection so
each stage keeps its share of a pyramid that averages to ``keep``; the key set is then capped
at the last stage's share. Presets ``"192"``,
``"128"``, ``"64"`` are the authors' threshold pairs.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from vtprune.config import (
    ModelInfo,
    VideoBudget,
    check_bool,
    check_choice,
    check_fraction,
    check_int,
    check_layer_list,
    register_method,
)
from vtprune.images import ImageView
from vtprune.methods.fastv import text_query_slots
from vtprune.scoring import projected_query_probs
from vtprune.search import increasing_lists, layer_candidates
from vtprune.selection import pyramid_average, pyramid_ratio, scale_layers
from vtprune.stages import DecodeStage, Pick, PrefillContext, PrefillStage, VisionStage

PRESETS = {"192": (0.001, 0.001), "128": (0.0012, 0.001), "64": (0.011, 0.01)}
DEFAULT_LAYERS = [2, 6, 10, 14]


@register_method("mustdrop")
@dataclass
class MustDrop(VideoBudget):
    """MustDrop (Liu et al., 2024).

    Args:
        preset: ``"192"``, ``"128"`` or ``"64"`` (the authors' thresholds; default ``"192"``).
        global_thr, individual_thr: explicit prefill thresholds (override the preset).
        layers: prefill filtering layers (default [2, 6, 10, 14] scaled to the depth; with ``keep`` on a
            shallow model whose first stage comes too late to reach it, the defaults move earlier).
        merge_threshold: window similarity for vision-stage merging (0.8); ``window`` size (3).
        key_ratio: share of tokens in the protected key set (0.08).
        decode: re-index earlier layers' KV caches to the final set after prefill (True).
        keep: a target layer-average fraction instead of thresholds.

    Example:
        >>> MustDrop(preset="64").thresholds()
        (0.011, 0.01)
    """

    preset: str | None = None
    global_thr: float | None = None
    individual_thr: float | None = None
    layers: list[int] | None = None
    merge_threshold: float = 0.8
    window: int = 3
    key_ratio: float = 0.08
    decode: bool = True

    def validate(self) -> None:
        if self.preset is not None:
            check_choice(self.name, "preset", self.preset, tuple(PRESETS))
        for name in ("global_thr", "individual_thr", "key_ratio", "merge_threshold"):
            if getattr(self, name) is not None:
                check_fraction(self.name, name, getattr(self, name), allow_zero=True)
        check_int(self.name, "window", self.window, minimum=2)
        if self.layers is not None:
            check_layer_list(self.name, "layers", self.layers, minimum=0, increasing=True)
        check_bool(self.name, "decode", self.decode)
        if self.keep is not None and (
            self.preset or self.global_thr is not None or self.individual_thr is not None
        ):
            raise ValueError(
                "mustdrop: give either 'keep' or thresholds ('preset', 'global_thr', 'individual_thr')"
            )

    @classmethod
    def tune_space(cls, info: ModelInfo, keep: float) -> dict[str, list]:
        """Filtering layers, the vision-stage merge threshold and window, and the key-set share for
        ``vtprune.tune`` (with ``keep`` the prefill thresholds are solved per request)."""
        cands = [x for x in layer_candidates(info.num_layers, first=0) if x <= info.num_layers - 2]
        lists = increasing_lists(cands, (2, 3, 4), first_below=keep * info.num_layers - 1)
        return {
            "layers": lists,
            "merge_threshold": [0.7, 0.8, 0.9, 0.95],
            "window": [2, 3],
            "key_ratio": [0.0, 0.04, 0.08],
        }

    def thresholds(self) -> tuple[float, float]:
        g, i = PRESETS[self.preset or "192"]
        return (self.global_thr if self.global_thr is not None else g), (
            self.individual_thr if self.individual_thr is not None else i
        )

    def stages(self, info: ModelInfo) -> list:
        layers = (
            list(self.layers) if self.layers is not None else scale_layers(DEFAULT_LAYERS, info.num_layers)
        )
        for layer in layers:
            # scores come from layer l's own attention, so l may not be the last layer
            if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < info.num_layers - 1:
                raise ValueError(
                    f"mustdrop: option 'layers' holds {layer!r}; allowed: integers in "
                    f"0..{info.num_layers - 2} for this {info.num_layers}-layer decoder"
                )
        g, i = self.thresholds()
        # scores come from layer l's own attention, so tokens leave from layer l + 1
        bounds = [min(layer + 1, info.num_layers - 1) for layer in layers]
        fractions = [None] * len(bounds)
        if self.keep is not None and self.layers is None:
            # layers before the first stage keep everything: move default stages earlier until keep fits
            while pyramid_average(bounds, 1e-6, info.num_layers) >= self.keep and bounds[0] > 1:
                bounds = sorted({max(1, b - 1) for b in bounds})
                layers = [b - 1 for b in bounds]
        if self.keep is not None:
            ratio = pyramid_ratio(self.keep, bounds, info.num_layers)
            if pyramid_average(bounds, 1e-6, info.num_layers) >= self.keep:
                raise ValueError(f"mustdrop: keep={self.keep} is unreachable with layers={layers}")
            fractions = [ratio**s for s in range(1, len(bounds) + 1)]
        # with keep, the protected key set may not outgrow the last stage's budget, or it would
        # hold every later stage above its share of the pyramid
        key_cap = fractions[-1] if self.keep is not None else None
        stages: list = [MustDropVisionStage(self, key_cap)]
        budget = None if self.keep is None else (self.keep, tuple(bounds), info.num_layers)
        stages += [
            MustDropPrefillStage(b, g, i, f, budget, s) for s, (b, f) in enumerate(zip(bounds, fractions))
        ]
        if self.decode:
            stages.append(DecodeStage(first_layer=bounds[0], key="mustdrop-decode"))
        return stages


class MustDropVisionStage(VisionStage):
    key = "mustdrop-vision"

    def __init__(self, cfg: MustDrop, key_cap: float | None = None):
        self.cfg, self.key_cap = cfg, key_cap

    def vision_layers(self, adapter) -> list[int]:
        # the key set reads the last tower layer (or the full-attention block standing for it)
        return [adapter.score_block(adapter.vision_layers_count - 1)]

    def vision_hidden_layers(self, adapter) -> list[int]:
        return [0]

    def expected_count(self, n_image: int) -> int:
        return n_image  # data-dependent: merging never adds tokens

    def budget(self, view: ImageView) -> None:
        return None  # data-dependent (similarity threshold; with keep, capped inside pick)

    def pick(self, view: ImageView, budget: None = None) -> Pick:
        """Kept local indices, the key set (protected), and the window merges of one image."""
        kept, key_set, merges = self.plan(view)
        feats = view.features
        replace = [(target.view(1), feats[members].mean(0, keepdim=True)) for target, members in merges]
        return Pick(kept, replace, protect=key_set)

    def plan(self, view: ImageView):
        """Kept local indices, the key set, and (target, members) merges of one image."""
        last = view.default_block(view.tower_layers - 1)  # as in vision_layers
        score = view.cls_scores(last)
        n_patch = view.num_tokens - view.num_newlines
        n_key = min(n_patch, math.ceil(self.cfg.key_ratio * max(n_patch - 1, 0)))
        if self.key_cap is not None:
            n_key = min(n_key, int(view.num_tokens * self.key_cap))
        key_set = score.topk(n_key).indices
        feats = view.tower_features(0).float()
        dropped = torch.zeros(view.num_tokens, dtype=torch.bool, device=feats.device)
        w = self.cfg.window
        sims, tiles = [], []
        for seg in view.segments:
            seg_tiles = _tiles(seg, w).to(feats.device)  # [T, w*w] token indices, row-major whole windows
            if seg_tiles.numel() == 0:
                continue
            seg_sims = window_similarity(feats[seg_tiles])
            ok = (seg_sims >= self.cfg.merge_threshold) & ~torch.isin(seg_tiles, key_set).any(1)
            sims.append(seg_sims[ok])
            tiles.append(seg_tiles[ok])
        if not tiles:
            return torch.arange(view.num_tokens, device=feats.device), key_set, []
        sims, tiles = torch.cat(sims), torch.cat(tiles)
        if self.cfg.keep is not None:
            # with keep, the merge may not remove more than the budget: the most similar windows go
            # first, and keep=1 merges none (keep-everything equals the unpruned model)
            room = view.num_tokens - math.ceil(self.cfg.keep * view.num_tokens)
            chosen = sims.argsort(descending=True, stable=True)[: room // (w * w - 1)]
            tiles = tiles[chosen.sort().values]
        centres = tiles[:, (w * w) // 2]
        dropped[tiles.flatten()] = True
        dropped[centres] = False
        merges = list(zip(centres, tiles))
        return torch.nonzero(~dropped).flatten(), key_set, merges


def window_similarity(x: torch.Tensor) -> torch.Tensor:
    """Mean pairwise cosine similarity within each window ``x [T, n, D]``, self-pairs excluded.

    Example:
        >>> window_similarity(torch.tensor([[[1.0, 0], [1, 0], [0, 1]]])).tolist()
        [0.3333333432674408]
    """
    n = x.shape[1]
    xn = torch.nn.functional.normalize(x.float(), dim=-1)
    sim = xn @ xn.transpose(1, 2)
    return (sim.sum((1, 2)) - sim.diagonal(dim1=1, dim2=2).sum(1)) / (n * (n - 1))


def _tiles(seg, w: int) -> torch.Tensor:
    rows, cols = seg.rows // w, seg.cols // w
    if rows == 0 or cols == 0:
        return torch.zeros(0, w * w, dtype=torch.long)
    grid = seg.indices().view(seg.rows, seg.cols)[: rows * w, : cols * w]
    return grid.reshape(rows, w, cols, w).permute(0, 2, 1, 3).reshape(rows * cols, w * w)


class MustDropPrefillStage(PrefillStage):
    needs_previous_input = True

    def __init__(
        self,
        layer: int,
        global_thr: float,
        individual_thr: float,
        fraction: float | None,
        budget: tuple | None = None,
        index: int = 0,
    ):
        self.layer, self.global_thr, self.individual_thr, self.fraction = (
            layer,
            global_thr,
            individual_thr,
            fraction,
        )
        # (keep, stage bounds, layers): with keep, each row's count is re-solved after the vision
        # merge, whose data-dependent savings would otherwise come on top of the pyramid
        self.budget, self.index = budget, index
        self.key = f"mustdrop@{layer}"

    def target(self, n_prompt: int, n_in: int) -> int:
        """Tokens this stage keeps for a row that had ``n_prompt`` visual tokens and ``n_in`` after
        the vision merge: the pyramid whose layer average, counting the merged-away tokens as saved,
        is ``keep * n_prompt``.

        Example:
            >>> st = MustDropPrefillStage(2, 0.0, 0.0, 0.5, budget=(0.5, (2, 4), 8), index=0)
            >>> st.target(100, 100), st.target(100, 60)  # without / after a merge to 60 tokens (all kept here)
            (50, 60)
        """
        if self.budget is None:
            return int(n_in * self.fraction)
        keep, bounds, num_layers = self.budget
        ratio = _merge_aware_ratio(keep, bounds, num_layers, n_in / max(n_prompt, 1))
        return min(n_in, int(n_prompt * ratio ** (self.index + 1)))

    def expected_count(self, n_in: int, n_current: int) -> int:
        return n_current if self.fraction is None else min(n_current, int(n_in * self.fraction))

    def select(self, ctx: PrefillContext) -> torch.Tensor:
        queries = text_query_slots(ctx.visual, ctx.valid)
        attn = ctx.layers[self.layer - 1].self_attn
        probs = projected_query_probs(attn, *ctx.previous_qk, ctx.cos, ctx.sin, ctx.valid, queries)
        summed, largest = probs.sum(1), probs.max(1).values
        keep = torch.zeros_like(ctx.visual)
        for b in range(ctx.visual.shape[0]):
            vis = ctx.visual[b]
            if not bool(vis.any()):
                continue
            s, m = summed[b][vis], largest[b][vis]
            total = s.sum()
            protected = ctx.protected[b][vis] if ctx.protected is not None else torch.zeros_like(vis[vis])
            if self.fraction is None:
                drop = (s < self.global_thr * total) & (m < self.individual_thr) & ~protected
                kept = ~drop
            else:
                kept = _keep_by_threshold_scale(
                    s,
                    m,
                    total,
                    protected,
                    self.global_thr,
                    self.individual_thr,
                    self.target(
                        int(ctx.visual_prompt[b]) if ctx.visual_prompt is not None else int(ctx.visual_in[b]),
                        int(ctx.visual_in[b]),
                    ),
                )
            keep[b, torch.nonzero(vis).flatten()[kept]] = True
        return keep


@functools.lru_cache(maxsize=1024)
def _merge_aware_ratio(keep: float, bounds: tuple[int, ...], num_layers: int, start: float) -> float:
    """The pyramid ratio after a merge down to ``start``; cached because every stage of a row, and
    every row with the same merge result, solves the same bisection (about 0.1 ms each)."""
    return pyramid_ratio(keep, list(bounds), num_layers, start=start)


def _keep_by_threshold_scale(s, m, total, protected, g, i, target: int) -> torch.Tensor:
    """Keep ``target`` tokens by scaling both thresholds by one factor ``c``.

    Token ``j`` is dropped when ``s_j < c*g*total`` and ``m_j < c*i``, i.e. when
    ``c > t_j = max(s_j / (g*total), m_j / i)``: the survivors of some ``c`` are always the
    tokens with the largest ``t_j``, so the factor that leaves ``target`` tokens is found by a
    sort (protected tokens have ``t = inf``).

    Example:
        >>> s, m = torch.tensor([0.5, 0.1, 0.3]), torch.tensor([0.2, 0.9, 0.1])
        >>> _keep_by_threshold_scale(s, m, 0.9, torch.zeros(3, dtype=torch.bool), 0.1, 0.1, 2).tolist()
        [True, True, False]
    """
    t = torch.maximum(s / (g * total).clamp(min=1e-12), m / max(i, 1e-12)).masked_fill(
        protected, float("inf")
    )
    order = torch.sort(t, descending=True, stable=True).indices
    kept = torch.zeros_like(protected)
    kept[order[: max(target, int(protected.sum()))]] = True
    return kept
