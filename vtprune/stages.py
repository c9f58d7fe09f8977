"""Stages: where a method acts, and what it sees there.

A method is a small list of stages. The runtime calls each stage with a context object and
expects a boolean mask over the current visual tokens saying which survive; it then removes
the others physically (hidden states, positions, masks, KV cache).

* :class:`VisionStage` acts once, before the language model, on the projected image tokens; its
  default ``select`` hands each image to a pure ``pick(view, budget)``.
* :class:`PrefillStage` acts before decoder layer ``layer`` during prefill; a
  :class:`SublayerTap` it names reads decoder sub-layers' inputs and outputs on the way.
* :class:`TowerStage` acts between vision-tower layers: the tokens it drops leave the tower
  itself, so later tower layers, the projector and the language model all see fewer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from vtprune.images import ImageLayout, ImageView, instruction_mask
from vtprune.recycling import cluster_count, recycle, recycle_clusters


@dataclass
class VisionContext:
    """What a vision stage sees (one batched call).

    ``visual`` marks the image tokens among the language model's input slots;
    ``layouts[b]`` describes the images of row ``b`` (positions, grids, newline flags);
    ``project`` maps feature-layer tower hidden states ``[k, D]`` to language-model inputs (the
    model's own projector), or is ``None`` where the family has no per-token one;
    ``adapter`` builds the per-image views (:meth:`views`), ``input_ids`` / ``valid`` locate the
    prompt's instruction tokens.
    """

    embeds: torch.Tensor
    visual: torch.Tensor
    layouts: list[list[ImageLayout]]
    project: Callable[[torch.Tensor], torch.Tensor] | None = None
    generator: torch.Generator | None = None
    extras: dict = field(default_factory=dict)
    replacements: list = field(default_factory=list)
    protected: list = field(default_factory=list)
    #: stage key -> ``[(row, positions)]``: the cluster centres ``recycle="clusters"`` added
    centres: dict = field(default_factory=dict)
    adapter: object = None
    input_ids: torch.Tensor | None = None
    valid: torch.Tensor | None = None
    _views: list | None = field(default=None, repr=False)

    def views(self) -> list[ImageView]:
        """One view per image of the batch, row by row (built once, shared by the stages)."""
        if self._views is None:
            valid = self.valid if self.valid is not None else torch.ones_like(self.visual)
            instruction = instruction_mask(self.visual, valid.bool())
            make = self.adapter.image_view if self.adapter is not None else ImageView
            self._views = [
                make(
                    img,
                    index=j,
                    embeds=self.embeds[img.row],
                    instruction=instruction[img.row],
                    input_ids=None if self.input_ids is None else self.input_ids[img.row],
                )
                for row in self.layouts
                for j, img in enumerate(row)
            ]
        return self._views

    def replace(self, row: int, position, vector: torch.Tensor) -> None:
        """Give a kept visual token a new input embedding (a merge result)."""
        self.replacements.append((row, position, vector))

    def protect(self, row: int, positions: torch.Tensor) -> None:
        """Mark tokens (sequence positions) that no later stage may drop (MustDrop's key set)."""
        self.protected.append((row, positions))


@dataclass
class PrefillContext:
    """What a prefill stage sees before decoder layer ``layer``.

    ``hidden`` is the output of layer ``layer - 1`` for the tokens still present;
    ``visual``/``valid`` flag visual slots and attendable slots; ``query_slot[b]`` is the slot
    of the row's last real token; ``visual_in[b]`` counts the row's visual tokens at the
    language model's input (the N of the papers); ``layers`` are the decoder layers;
    ``cos``/``sin`` the rotary tables at the present slots; ``previous_qk`` the q/k
    projection outputs of layer ``layer - 1`` (for stages with ``needs_previous_input``);
    ``answer_query`` (training) marks the slots just before an answer span.
    """

    layer: int
    hidden: torch.Tensor
    visual: torch.Tensor
    valid: torch.Tensor
    query_slot: torch.Tensor
    visual_in: torch.Tensor
    layers: nn.ModuleList
    cos: torch.Tensor
    sin: torch.Tensor
    previous_qk: tuple | None = None  # q/k projection outputs of layer ``layer - 1``
    previous_v: torch.Tensor | None = None  # its v projection output (``needs_previous_values``)
    answer_query: torch.Tensor | None = None
    protected: torch.Tensor | None = None
    visual_prompt: torch.Tensor | None = None  # per row, visual tokens before any vision stage
    visual_tower: torch.Tensor | None = None  # per row, visual tokens a tower stage let through
    lm_input: LMInput | None = None  # the language model's input (stages with ``needs_lm_input``)
    final_norm: nn.Module | None = None  # the decoder's last norm (DART measures similarity after it)
    merges: list = field(default_factory=list)
    orig_index: torch.Tensor | None = None  # [B, L] each slot's place in the caller's sequence (-1: padding)
    tapped: dict | None = None  # what the stage's SublayerTap gathered so far in this request

    def merge(self, row: int, members: torch.Tensor, centres: torch.Tensor) -> None:
        """Replace kept slot ``centres[i]`` by the mean of the hidden states of ``members``
        sharing its centre (slots of row ``row``; each centre is also listed as its own member)."""
        self.merges.append((row, members, centres))


@dataclass
class LMInput:
    """The language model's input embeddings (the input of decoder layer 0), for stages that
    read it (SparseVLM chooses its rater tokens there).

    ``embeds [B, L0, D]``, ``visual`` / ``valid [B, L0]`` describe the token set layer 0 saw;
    ``slots [B, L]`` gives, for each slot the stage sees now, its slot in ``embeds`` (-1 at padding).
    """

    embeds: torch.Tensor
    visual: torch.Tensor
    valid: torch.Tensor
    slots: torch.Tensor


@dataclass
class TowerContext:
    """What a tower stage sees after tower layer ``layer`` (one tower batch: a row per crop).

    ``hidden`` ``[B, T, D]`` is the layer's output (the next layer's input); ``valid`` ``[B, T]``
    flags real slots (rows keep different counts, the rest is padding the tower masks out);
    ``index`` ``[B, T]`` is each slot's original tower token (0 is CLS); ``cls_probs``
    ``[B, H, T]`` the CLS query row of this layer's attention (softmax over the valid keys),
    computed beside SDPA from the layer's own projections; ``values`` ``[B, H, T, d]`` its
    value vectors. ``feature_layer`` is the tower layer whose output becomes the image
    features; ``patches`` the patch tokens a crop had at the tower's input, ``cls_in_lm``
    whether the CLS token also reaches the language model (LLaVA's "full" strategy).
    ``scratch`` is the stage's own per-call memory (e.g. scores carried across layers).
    """

    layer: int
    hidden: torch.Tensor
    valid: torch.Tensor
    index: torch.Tensor
    cls_probs: torch.Tensor
    values: torch.Tensor
    feature_layer: int
    patches: int
    cls_in_lm: bool = False
    scratch: dict = field(default_factory=dict)
    #: towers without CLS (Qwen2-VL): ``cls_probs`` is the mean-query "global" row instead, rows
    #: are attention sequences (images / frames), slots are patches whose ``group`` consecutive
    #: slots form one language-model token (kept or dropped together), ``index`` is the patch's
    #: original place in its row and ``row_patches`` ``[B]`` each row's patches at the tower input
    has_cls: bool = True
    group: int = 1
    row_patches: torch.Tensor | None = None
    #: stages with ``needs_queries`` (Zero-TPrune): every slot's query and key ``[B, H, T, d]``
    #: (float32, rotary applied where the tower applies it) and the layer's softmax scale, for
    #: attention maps computed one image at a time beside SDPA; ``None`` for other stages
    queries: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    scale: float = 1.0
    #: towers whose rows are parts of larger images (LLaVA-NeXT crops; Qwen: a video's tubelets, in
    #: whole merge groups): ``row_target`` ``[B]`` the patches each row should keep (the image's
    #: budget split over its crops), ``candidates``
    #: ``[B, T]`` the slots whose tokens can reach the language model (others, cut by unpadding,
    #: may leave freely); ``None`` where every patch counts and ``patches`` sets the target
    row_target: torch.Tensor | None = None
    candidates: torch.Tensor | None = None


class Stage:
    point: str = "?"
    key: str = "?"
    #: the selection reads the prompt: an uncached replay of a longer prompt must reuse the
    #: prefill's selection rather than recompute it (prefill stages; CDPruner's relevance)
    reads_prompt: bool = False

    def describe(self) -> str:
        return self.key


@dataclass
class Pick:
    """What a vision stage keeps of one image (indices local to the image's tokens).

    ``replace`` gives kept tokens new input embeddings (merges): ``(indices [m], vectors [m, D])``
    pairs, applied in order; ``protect`` marks kept tokens no later stage may drop.
    """

    kept: torch.Tensor
    replace: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    protect: torch.Tensor | None = None


class VisionStage(Stage):
    """Acts once before the language model.

    Subclasses implement :meth:`pick` (one image: its view and its budget in, the kept tokens
    out) and, where their budget is not ``round(keep * tokens)``, :meth:`budget`; the default
    :meth:`select` loops over the images. A stage that needs the whole batch at once may
    override :meth:`select` instead.

    ``recycle`` (``vtprune.recycling.RECYCLE``) folds each image's dropped tokens into its kept
    ones after the pick (and after the pick's own merges), the same way for every stage.
    """

    point = "vision"
    #: the stage reads vision-tower keys (VisionZip's similarity), not only attention scores
    needs_keys: bool = False
    #: the kept fraction per image the default :meth:`budget` spends (``None``: the stage's own rule)
    keep: float | None = None
    #: how dropped tokens are folded into kept ones (``"none"``: not at all)
    recycle: str = "none"
    #: videos: ``"clip"`` spends one budget over all frames, ``"frame"`` runs :meth:`pick` on each
    #: frame with its own budget (set from the method's ``video_budget`` option)
    video_budget: str = "clip"
    #: the tower score :meth:`ImageView.cls_scores` reads: ``"attention"`` (the CLS row, or the
    #: received-attention substitute) or ``"wpr"`` (weighted PageRank; towers without CLS)
    tower_score: str = "attention"

    def vision_layers(self, adapter) -> list[int]:
        """Vision-tower layers whose CLS attention (or substitute) this stage reads (no side effects)."""
        return []

    def vision_hidden_layers(self, adapter) -> list[int]:
        """Vision-tower layers whose output features this stage reads."""
        return []

    def vision_hub(self, adapter) -> dict[int, float]:
        """Tower layer -> threshold for the layers (among :meth:`vision_layers`) where this stage
        reads each token's attention from the hub tokens (``ImageView.hub_scores``)."""
        return {}

    def budget(self, view: ImageView) -> int | None:
        """Tokens this image may keep: ``round(keep * tokens)`` by default."""
        return None if self.keep is None else int(self.keep * view.num_tokens + 0.5)

    def pick(self, view: ImageView, budget: int | None) -> torch.Tensor | Pick:
        """Kept local indices of one image (or a :class:`Pick` with merges / protected tokens)."""
        raise NotImplementedError

    def select(self, ctx: VisionContext) -> torch.Tensor:
        """Boolean ``[B, L]`` mask: which visual slots to keep (the images' picks, merges applied)."""
        keep = torch.zeros_like(ctx.visual)
        for view in self._views(ctx):
            budget = self.budget(view)
            # clusters take their slots out of the budget: the token count stays the same
            n_clusters = (
                cluster_count(budget, view.num_tokens - view.num_newlines)
                if self.recycle == "clusters"
                else 0
            )
            out = self.pick(view, budget - n_clusters if n_clusters else budget)
            out = out if isinstance(out, Pick) else Pick(out)
            pos = view.positions
            kept = out.kept.to(pos.device)
            keep[view.row, pos[kept].to(keep.device)] = True
            for local, vectors in out.replace:
                ctx.replace(view.row, pos[local.to(pos.device)], vectors)
            if self.recycle == "clusters" and n_clusters:
                centres, means = recycle_clusters(
                    self._merged(view, out.replace), kept, n_clusters, ~view.newline
                )
                at = pos[centres.to(pos.device)]
                keep[view.row, at.to(keep.device)] = True
                ctx.replace(view.row, at, means)
                ctx.centres.setdefault(self.key, []).append((view.row, at))
            elif self.recycle == "nearest":
                ctx.replace(view.row, pos[kept], self.recycled(view, kept, out.replace))
            if out.protect is not None:
                ctx.protect(view.row, pos[out.protect.to(pos.device)])
        return keep

    def _views(self, ctx: VisionContext) -> list[ImageView]:
        """The units :meth:`pick` runs on: the images, or each video frame alone (``"frame"``)."""
        views = ctx.views()
        if self.video_budget == "frame":
            views = [part for view in views for part in view.frame_views()]
        return views

    @staticmethod
    def _merged(view: ImageView, merges=()) -> torch.Tensor:
        """The image's features with the pick's own merges applied."""
        feats = view.features
        if merges:
            feats = feats.clone()
            for local, vectors in merges:
                feats[local.to(feats.device)] = vectors.to(feats.dtype)
        return feats

    def recycled(self, view: ImageView, kept: torch.Tensor, merges=()) -> torch.Tensor:
        """``[k, D]`` new embeddings of the ``kept`` local tokens with the dropped ones folded in
        (``self.recycle``); the pick's own ``merges`` are applied first. Newlines take no part."""
        return recycle(self.recycle, self._merged(view, merges), kept, ~view.newline)

    def recycle_replayed(
        self, ctx: VisionContext, keep: torch.Tensor, centres: torch.Tensor | None = None
    ) -> None:
        """Redo the recycling for a replayed selection ``keep [B, L]`` (a stage that reads the
        prompt is not recomputed on replay, but its merges must be: they shape the embeddings).
        ``centres [B, L]`` (``recycle="clusters"``) flags the kept slots that were cluster
        centres: the rest is the pick, whose dropped tokens are clustered again as before.
        Reads each image's kept count back to the host (replay is not the hot path)."""
        for view in self._views(ctx):
            pos = view.positions
            kept = torch.nonzero(keep[view.row].to(pos.device)[pos]).flatten()
            if self.recycle != "clusters":
                ctx.replace(view.row, pos[kept], self.recycled(view, kept))
                continue
            if centres is None:
                continue
            is_centre = centres[view.row].to(pos.device)[pos]
            picked = torch.nonzero(keep[view.row].to(pos.device)[pos] & ~is_centre).flatten()
            n_clusters = int(is_centre.sum())
            if n_clusters:
                local, means = recycle_clusters(view.features, picked, n_clusters, ~view.newline)
                ctx.replace(view.row, pos[local.to(pos.device)], means)

    def expected_count(self, n_image: int) -> int:
        """Tokens an image of ``n_image`` tokens keeps (for FLOPs without running the model)."""
        raise NotImplementedError


class SublayerTap:
    """Reads decoder sub-layers' inputs and outputs during prefill, reduced on the fly.

    The runtime hooks the attention and MLP modules of each layer in :attr:`layers` (only
    those) and calls :meth:`observe` with each module's input (the normed hidden states) and
    output (before the residual add). The tap keeps what it needs in ``memory``, one dict per
    request shared by every stage that names the tap (``ctx.tapped`` at those stages); it must
    not keep the hidden states themselves.
    """

    key: str = "?"
    layers: tuple[int, ...] = ()

    def observe(self, memory: dict, layer: int, kind: str, x_in, x_out, token_set, orig_len: int) -> None:
        """``kind`` is ``"attn"`` or ``"mlp"``; ``x_in``/``x_out`` are ``[B, L, D]`` over the slots
        of ``token_set`` (a ``vtprune.runtime.tokens.TokenSet``); ``orig_len`` is the caller's
        sequence length (``token_set.orig_index`` indexes it)."""
        raise NotImplementedError


class PrefillStage(Stage):
    point = "prefill"
    reads_prompt = True  # every prefill stage scores with the prompt's own tokens
    layer: int = 0
    #: sub-layer inputs/outputs the stage reads (shared by the stages naming the same tap)
    tap: SublayerTap | None = None
    #: a stage that scores with layer ``layer - 1``'s own attention needs that layer's input
    needs_previous_input: bool = False
    #: the stage also reads layer ``layer - 1``'s value projections (``ctx.previous_v``)
    needs_previous_values: bool = False
    #: the stage reads the language model's input embeddings (``ctx.lm_input``)
    needs_lm_input: bool = False

    def select(self, ctx: PrefillContext) -> torch.Tensor:
        """Boolean ``[B, L]`` mask over the present slots: which visual slots to keep."""
        raise NotImplementedError

    def expected_count(self, n_in: int, n_current: int) -> int:
        """Visual tokens left after this stage, given N at the LLM input and the current count."""
        raise NotImplementedError


class SkipStage(Stage):
    """Spends less computation on visual rows in chosen layers during prefill (no tokens leave)."""

    point = "skip"
    layers: set[int] = set()
    attention_layers: set[int] = set()
    #: whether ``attention`` also runs at decode steps (else the model's own backend does)
    decode: bool = False

    def attention(self, module, q, k, v, mask, scaling, state) -> torch.Tensor:
        """Prefill attention output ``[B, L, H, D]`` for a layer in ``attention_layers``."""
        raise NotImplementedError

    def mlp(self, mlp: nn.Module, x: torch.Tensor, visual: torch.Tensor, full) -> torch.Tensor:
        """The MLP output for ``x [B, L, D]`` whose visual rows are ``visual [B, L]``; ``full``
        is the module's own forward."""
        return full(x)


class DecodeStage(Stage):
    """After prefill, re-index the KV caches of layers ``first_layer``.. to the final token set.

    Decoding then attends only to the tokens that survived every prefill stage, in every layer
    from ``first_layer`` on (earlier layers keep what they saw at prefill).
    """

    point = "decode"
    #: re-index layers ``first_layer``.. to the final prefill set (MustDrop); a per-layer KV
    #: stage (PrefixKV) sets this False and answers :meth:`layer_keep` instead
    reindex: bool = True

    def __init__(self, first_layer: int, key: str = "decode"):
        self.first_layer, self.key = first_layer, key

    def tap_layers(self, num_layers: int) -> set[int]:
        """Decoder layers whose prefill attention inputs :meth:`observe` must see."""
        return set()

    def observe(self, layer: int, query, key, valid, scaling: float, state) -> None:
        """Prefill of a tapped layer: its post-rotary ``query [B, H, M, D]`` and ``key [B, H_kv, M, D]``
        (as the attention backend gets them), with ``valid [B, M]`` the slots that may be attended."""

    def layer_keep(self, state) -> dict[int, torch.Tensor]:
        """After prefill: per layer, boolean ``[B, M]`` over its cache slots, the ones it keeps."""
        return {}


class TowerStage(Stage):
    """Drops patch tokens between vision-tower layers (FlowCut).

    The runtime calls :meth:`after_layer` with a :class:`TowerContext` after every layer in
    :meth:`tower_layers`; the kept slots leave the tower before the next layer. At the language
    model the image's placeholders shrink to the survivors (:meth:`select`, the same compaction
    a vision stage gets), so ``keep`` counts what reaches the language model.
    """

    point = "tower"
    recycle = "none"  # the compaction at the language model has nothing left to fold in
    #: the stage reads every query row of its layers (``ctx.queries`` / ``ctx.keys``), not only CLS
    needs_queries: bool = False
    #: model families the stage's rule is written for (``None``: every family with a tower runner);
    #: the runtime refuses the others by name before any hook is installed
    families: tuple[str, ...] | None = None

    def tower_layers(self, feature_layer: int, depth: int) -> list[int]:
        """Tower layers after which :meth:`after_layer` runs (their CLS row and values are read)."""
        raise NotImplementedError

    def after_layer(self, ctx: TowerContext) -> torch.Tensor | None:
        """Boolean ``[B, T]``: the slots to keep (a subset of ``ctx.valid``, CLS kept), or
        ``None`` to keep everything."""
        raise NotImplementedError

    def expected_count(self, n_image: int) -> int:
        """Tokens of an ``n_image``-token image that reach the language model."""
        raise NotImplementedError

    def expected_tower_units(
        self, units: int, feature_layer: int, depth: int, entropy: float = 0.0
    ) -> list[int]:
        """Per tower layer, the units (patches per crop, or merge groups per image) it runs on, for
        FLOPs estimates; ``entropy`` stands in for what data-dependent schedules read at run time."""
        raise NotImplementedError

    def select(self, ctx: VisionContext) -> torch.Tensor:
        """Boolean ``[B, L]``: the image placeholders whose tokens left the tower."""
        keep = torch.zeros_like(ctx.visual)
        for row in ctx.layouts:
            for img in row:
                kept = img.vision.get("tower_kept")
                pos = img.positions if kept is None else img.positions[kept.to(img.positions.device)]
                keep[img.row, pos.to(keep.device)] = True
        return keep


def expected_tokens_per_layer(stages: list[Stage], n_visual: int, num_layers: int) -> list[int]:
    """Visual tokens each decoder layer sees under ``stages`` for one image of ``n_visual`` tokens.

    Example:
        >>> from vtprune.methods.fastv import FastVStage
        >>> expected_tokens_per_layer([FastVStage(layer=2, ratio=0.25, score="last")], 576, 4)
        [576, 576, 144, 144]
    """
    n = n_visual
    # the tower's survivors come first, whatever the order of the plan (vision stages act on them)
    for s in sorted(stages, key=lambda s: not isinstance(s, TowerStage)):
        if isinstance(s, (VisionStage, TowerStage)):
            n = s.expected_count(n)
    n_in, counts = n, []
    by_layer = sorted((s for s in stages if isinstance(s, PrefillStage)), key=lambda s: s.layer)
    for layer in range(num_layers):
        for s in by_layer:
            if s.layer == layer:
                n = min(n, s.expected_count(n_in, n))
        counts.append(n)
    return counts
