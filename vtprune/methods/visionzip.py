"""VisionZip: dominant tokens by CLS attention, the rest merged into a few contextual tokens.

Per partition (the image for LLaVA-1.5 and Qwen2-VL; the base image and *each* crop for
LLaVA-NeXT, so explicit counts are per crop), with ``dominant + contextual`` tokens to keep:

* Dominant: the CLS token counts as one of the ``dominant`` tokens, as in the official code
  (which passes ``dominant - 1`` to its top-k); the other ``dominant - 1`` are the patches with
  the highest CLS attention (summed over heads) at the feature layer.
* Contextual: of the remaining ``n`` patches, in their original order, every ``n // contextual``-th
  one (the first ``contextual`` of them) is a merge target; every other remaining patch joins the
  target whose tower key (mean over heads) is most similar by cosine.
* Merge (``merge="official"``, default): a target becomes ``target + mean(its other members)``,
  formed on the tower's feature-layer hidden states and then passed through the model's own
  projector, as the official code does. ``merge="mean"`` instead averages the group, target
  included, on the projected features.

The papers' settings 54+10 / 108+20 / 162+30 give 64 / 128 / 192 tokens per 576. ``keep``
takes ``round(keep * tokens)`` per image: protected LLaVA-NeXT newline tokens come out of it,
the rest is split over the partitions by size and each share 54:10 into dominant:contextual.

Decisions (the prompt fixes the placeholder count, and kept tokens keep their positions):

* The CLS token has no placeholder of its own; its projected feature takes the slot of the
  first patch of its partition that is neither dominant nor a target (always a merged one).
  A partition that keeps all its tokens is left untouched (no CLS, nothing merged).
* Merged tokens sit at their target's original position.
* LLaVA-NeXT: newline tokens are kept by default (``drop_newlines=True`` drops them as the
  official code does) and count towards ``keep``; the candidates of a crop are its tokens that
  survive unpadding (the official code picks over the whole crop, padding included).
* Qwen2-VL has no CLS token and no per-token tower feature before its projector: the merger
  maps each token's 2x2 patches through a per-patch LayerNorm (in Qwen2.5-VL, reordered into
  attention windows). All ``dominant`` tokens are patches, ranked by the received-attention
  substitute score, and ``merge="official"`` forms ``target + mean(other members)`` on the
  merger's outputs, the language model's inputs.
* LLaVA-OneVision: no CLS either (received-attention substitute per SigLIP crop); its downscaled
  tiles and pooled video frames mix several tower tokens per token, so ``merge="official"`` is
  formed on the language model's inputs too. Partitions are the base crop and tiles, or the frames.
* On towers without CLS ``score="wpr"`` ranks the dominant tokens by Zero-TPrune's weighted
  PageRank of the block's head-mean attention map (``vtprune.attention_graph``) instead of the
  received attention; towers with CLS refuse it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vtprune.attention_graph import TOWER_SCORES
from vtprune.config import (
    ModelInfo,
    VideoBudget,
    check_bool,
    check_choice,
    check_fraction,
    check_vision_layer,
    register_method,
)
from vtprune.images import ImageView
from vtprune.selection import split_budget
from vtprune.stages import Pick, VisionStage

DOMINANT_SHARE = 54 / 64
MERGES = ("official", "mean")


@register_method("visionzip")
@dataclass
class VisionZip(VideoBudget):
    """VisionZip (Yang et al., 2024).

    Args:
        dominant: dominant tokens per partition (image, or LLaVA-NeXT base/crop), CLS included
            where the tower has one.
        contextual: contextual (merged) tokens per partition.
        keep: alternatively, the kept fraction of each image, split 54:10.
        share: with ``keep``, the dominant tokens' share of the budget instead of 54/64 (the
            contextual tokens get the rest); a number in (0, 1].
        layer: tower layer whose CLS attention and keys are used (default: the feature layer).
        merge: ``"official"`` (target + mean of the other members, before the projector) or
            ``"mean"`` (mean of the group, target included, after the projector).
        drop_newlines: drop LLaVA-NeXT row-newline tokens as the official code does.
        score: ``"attention"`` (default: the CLS attention, or the received-attention substitute
            on towers without CLS) or ``"wpr"`` (weighted PageRank ranks the dominant tokens;
            towers without CLS only).

    Example:
        >>> VisionZip(dominant=54, contextual=10).per_partition(576)
        (54, 10)
    """

    dominant: int | None = None
    contextual: int | None = None
    layer: int | None = None
    merge: str = "official"
    drop_newlines: bool = False
    score: str = "attention"
    share: float | None = None

    def validate(self) -> None:
        for name in ("dominant", "contextual"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise ValueError(f"visionzip: option {name!r}={v!r} is invalid; allowed: an integer >= 0")
        v = self.layer  # a tower layer: the type here, the range against the tower
        if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            raise ValueError(
                f"visionzip: option 'layer'={v!r} is invalid; allowed: an integer (a tower layer)"
            )
        if self.keep is not None and (self.dominant is not None or self.contextual is not None):
            raise ValueError("visionzip: give either 'keep' or 'dominant'/'contextual', not both")
        check_choice(self.name, "merge", self.merge, MERGES)
        check_choice(self.name, "score", self.score, TOWER_SCORES)
        if self.share is not None:
            check_fraction(self.name, "share", self.share)
            if self.dominant is not None or self.contextual is not None:
                raise ValueError(
                    "visionzip: 'share' splits a 'keep' budget; give it with 'keep', not 'dominant'/'contextual'"
                )
        check_bool(self.name, "drop_newlines", self.drop_newlines)

    @classmethod
    def tune_space(cls, info: ModelInfo, keep: float) -> dict[str, list]:
        """The dominant share of the budget, the scoring tower layer and the merge for ``vtprune.tune``."""
        depth = info.vision_layers or 1
        layers = sorted({-1, -2, -(depth // 2 or 1)} & set(range(-depth, 0)))
        return {"share": [0.5, 0.7, 54 / 64, 0.95, 1.0], "layer": [None, *layers], "merge": list(MERGES)}

    def per_partition(self, n: int) -> tuple[int, int]:
        """(dominant, contextual) for a partition of ``n`` tokens."""
        if self.keep is None and self.dominant is None and self.contextual is None:
            return min(n, 54), min(max(0, n - 54), 10)
        if self.keep is not None:
            return self.split(int(self.keep * n + 0.5))
        d = min(n, self.dominant or 0)
        return d, min(n - d, self.contextual or 0)

    def split(self, k: int) -> tuple[int, int]:
        """``k`` kept tokens as (dominant, contextual), in the papers' 54:10 proportion (or ``share``)."""
        d = min(k, int(k * (DOMINANT_SHARE if self.share is None else self.share) + 0.5))
        return d, k - d

    def stages(self, info: ModelInfo) -> list:
        check_vision_layer(self.name, "layer", self.layer, info)
        return [VisionZipStage(self)]


class VisionZipStage(VisionStage):
    key = "visionzip"
    needs_keys = True

    def __init__(self, cfg: VisionZip):
        self.cfg = cfg
        self.tower_score = cfg.score

    def layer(self, default: int) -> int:
        """The scoring layer: ``layer`` if set, else ``default`` (the feature layer's score block:
        on Qwen2.5-VL the last full-attention block at or before it)."""
        return default if self.cfg.layer is None else self.cfg.layer

    def vision_layers(self, adapter) -> list[int]:
        return [self.layer(adapter.score_block(adapter.vision_feature_layer()))]

    def vision_hidden_layers(self, adapter) -> list[int]:
        # the projector's input (CLS and merges are formed there) is the feature layer's output,
        # whichever layer the scores come from
        return [adapter.vision_feature_layer()] if adapter.tower_projector() is not None else []

    def expected_count(self, n_image: int) -> int:
        d, c = self.cfg.per_partition(n_image)
        return d + c

    def budget(self, view: ImageView) -> list[tuple[int, int]]:
        """(dominant, contextual) per partition.

        With ``keep`` the image's budget is ``round(keep * tokens)``: the protected newline tokens
        come out of it, and the rest is split over the partitions in proportion to their size
        (largest remainders), so small LLaVA-NeXT crops do not each round up on top of it.
        """
        sizes = [p.numel() + c.numel() for p, c in view.partitions()]
        if self.cfg.keep is None:
            return [self.cfg.per_partition(n) for n in sizes]
        n_fixed = 0 if self.cfg.drop_newlines else view.num_newlines
        total = max(0, int(self.cfg.keep * view.num_tokens + 0.5) - n_fixed)
        return [self.cfg.split(k) for k in split_budget(total, sizes)]

    def pick(self, view: ImageView, budget: list[tuple[int, int]]) -> Pick:
        """Kept indices within the image's tokens, with the merged (and carried CLS) vectors."""
        layer = self.layer(view.score_layer)
        scores = view.cls_scores(layer, self.tower_score)
        keys = view.keys(layer)
        tower = _TowerFeatures(view) if view.projector is not None else None
        fixed = view.newline_indices
        if self.cfg.drop_newlines:
            fixed = fixed[:0]
        kept, merges = [fixed], []
        for (patches, cls), (d, c) in zip(view.partitions(), budget):
            if d + c >= patches.numel() + cls.numel():  # nothing to prune: no merge, no CLS feature
                kept += [patches, cls]
                continue
            # the CLS token is one of the dominant ones where it reaches the language model: in its
            # own placeholder ("full" feature strategy) or projected from the tower into a free slot
            with_cls = d > 0 and (cls.numel() > 0 or tower is not None)
            plan = zip_partition(scores[patches], keys[patches], d - with_cls, c)
            kept.append(patches[plan.kept])
            merges += [(patches[t], patches[m]) for t, m in zip(plan.targets, plan.members) if m.numel()]
            if with_cls and cls.numel():
                kept.append(cls)
            elif with_cls:
                slot = patches[first_free(patches.numel(), plan.kept)]
                kept.append(slot.view(1))
                tower.add_cls(slot, patches)
        return Pick(torch.cat(kept).sort().values, self._merged(view, merges, tower))

    def _merged(self, view: ImageView, merges: list, tower) -> list:
        """Each merged target's (and carried CLS's) new input embedding."""
        out = []
        if tower is not None and self.cfg.merge == "official":
            for target, members in merges:
                tower.add_merge(target, members)
        else:  # on the language model's inputs: "mean", or a tower without per-token features
            lm = view.features
            for target, members in merges:
                out.append((target.view(1), self._lm_merge(lm[target], lm[members]).unsqueeze(0)))
        if tower is not None:
            out += tower.project()
        return out

    def _lm_merge(self, target: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
        if self.cfg.merge == "official":
            return target + others.mean(0)
        return torch.cat([target.unsqueeze(0), others]).mean(0)


class _TowerFeatures:
    """Feature-layer hidden states of one image's tower tokens, and vectors to project from them.

    Token ``i`` of the image came from tower row ``source[i]`` (CLS at row 0 of each crop);
    :meth:`project` runs the model's projector once over everything added.
    """

    def __init__(self, view: ImageView):
        hidden = view.tower_hidden(view.feature_layer)  # [crops, 1 + patches, D]
        self.per_crop = hidden.shape[1]
        self.flat = hidden.reshape(-1, hidden.shape[-1])
        self.source = view.source.to(self.flat.device)
        self.projector = view.projector
        self.slots: list[torch.Tensor] = []
        self.rows: list[torch.Tensor] = []

    def _hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.flat[self.source[tokens.to(self.source.device)]]

    def add_cls(self, slot: torch.Tensor, part: torch.Tensor) -> None:
        crop = self.source[part[0]] // self.per_crop  # stays a tensor: no host read
        self.slots.append(slot.view(1))
        self.rows.append(self.flat[crop * self.per_crop].unsqueeze(0))

    def add_merge(self, target: torch.Tensor, members: torch.Tensor) -> None:
        # the official combination: the target plus the mean of the others assigned to it
        h = self._hidden(target.view(1)) + self._hidden(members).mean(0, keepdim=True)
        self.slots.append(target.view(1))
        self.rows.append(h)

    def project(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if not self.rows:
            return []
        return [(torch.cat(self.slots), self.projector(torch.cat(self.rows)))]


@dataclass
class ZipPlan:
    """One partition's selection (indices local to it): dominant patches, merge targets and, per
    target, the other patches merged into it."""

    dominant: torch.Tensor
    targets: torch.Tensor
    members: list[torch.Tensor]

    @property
    def kept(self) -> torch.Tensor:
        return torch.cat([self.dominant, self.targets]).sort().values


def contextual_targets(n: int, contextual: int) -> torch.Tensor:
    """Which of ``n`` remaining tokens become merge targets: every ``n // contextual``-th, the first
    ``contextual`` of them (the official spacing; the tail of the range gets none).

    Example:
        >>> contextual_targets(10, 3).tolist()
        [0, 3, 6]
    """
    contextual = min(contextual, n)
    if contextual == 0:
        return torch.zeros(0, dtype=torch.long)
    return torch.arange(0, n, max(1, n // contextual))[:contextual]


def zip_partition(scores: torch.Tensor, keys: torch.Tensor, dominant: int, contextual: int) -> ZipPlan:
    """Dominant + contextual selection within one partition.

    ``dominant`` patches with the highest ``scores`` stay; of the rest (in order),
    :func:`contextual_targets` picks the targets and each other patch joins the target with the
    most similar key (cosine; the first on ties).

    Example:
        >>> s = torch.tensor([9.0, 1, 2, 8, 3, 4])
        >>> k = torch.tensor([[1.0, 0], [0, 1], [0, 1], [1, 0], [1, 0.1], [0.1, 1]])
        >>> plan = zip_partition(s, k, dominant=2, contextual=2)
        >>> plan.kept.tolist(), [m.tolist() for m in plan.members]
        ([0, 1, 3, 4], [[2, 5], []])
    """
    dominant = min(dominant, scores.numel())
    order = torch.sort(scores, descending=True, stable=True).indices
    dom = order[:dominant].sort().values
    rest = order[dominant:].sort().values
    pick = contextual_targets(rest.numel(), contextual).to(rest.device)
    targets = rest[pick]
    others = rest[~torch.isin(torch.arange(rest.numel(), device=rest.device), pick)]
    if not others.numel() or not targets.numel():
        return ZipPlan(dom, targets, [others[:0] for _ in range(targets.numel())])
    kn = torch.nn.functional.normalize(keys.float(), dim=-1)
    nearest = (kn[others] @ kn[targets].T).argmax(1)
    return ZipPlan(dom, targets, [others[nearest == j] for j in range(targets.numel())])


def first_free(n: int, taken: torch.Tensor) -> torch.Tensor:
    """The lowest index in ``range(n)`` not in ``taken`` (where a partition's CLS goes), as a
    0-d tensor on ``taken``'s device (no host read).

    Example:
        >>> int(first_free(5, torch.tensor([0, 1, 3])))
        2
    """
    free = torch.ones(n, dtype=torch.int8, device=taken.device)
    free[taken] = 0
    return torch.argmax(free)
