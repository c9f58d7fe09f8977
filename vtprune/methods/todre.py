"""ToDRE: a diverse subset before the LLM, then the task-relevant part of it at a later layer.

Li, Yang, Lu et al., "ToDRE: Visual Token Pruning via Diversity and Task Awareness" (arXiv
2505.18757, v1; v2 retitled "Effective Visual Token Pruning via Token Diversity and Task
Relevance"). No official code is published, so this follows the paper's description:

1. Vision stage (token diversity): per image, greedy k-center (max-min, farthest-point)
   selection on cosine distance between the projector outputs
   (``vtprune.diversity.max_min_diversity``), starting from the most important token.
2. Prefill stage (task relevance, "information migration"): before decoder layer ``layer``,
   the visual tokens that the instruction attends to least at layer ``layer - 1`` leave. The
   attention rows are recomputed beside SDPA / FlashAttention
   (``vtprune.scoring.projected_query_probs``), never by switching the model to eager.

Choices the paper leaves open (each an option where cheap):

* Stage 1 rule: v1's greedy k-center (the max-min rule). v2 replaces it by greedy max-sum
  diversification (``argmax_j q_j + lambda * sum_s dist(j, s)``) with an unstated ``lambda``;
  that variant is not implemented.
* Stage 1 start: ``init="importance"`` (default) starts from the token with the largest CLS
  attention at the tower's feature layer (Qwen2-VL: the documented substitute, the attention a
  patch receives, ``ImageView.cls_scores``), read by a one-row probe beside the tower's own
  attention. The paper text available to us does not pin the start down; ``init="isolated"``
  starts as DivPrune does (the token whose nearest neighbour is farthest) and needs no probe.
* Stage 2 layer: ``layer`` (default half the decoder depth, 16 of 32) is the first layer that no
  longer sees the removed tokens; the scores come from layer ``layer - 1``, as FastV's.
* Stage 2 rows: ``score="last"`` (default) reads the last prompt token's row (the instruction's
  last token); ``score="mean"`` averages over every text row after the image. Mean over heads.
* Stage 2 rule: top-k by that attention, not a threshold, so that ``keep`` is met.
* Budget: ``keep`` is the layer-average fraction over both stages (tokens per layer averaged
  over the decoder, over the image tokens before any pruning). ``split`` is the share of the
  vision stage's tokens that stage 2 keeps (default 0.5; 0 removes every visual token from
  ``layer`` on, the paper's extreme). With ``L`` layers and stage-2 layer ``K`` the vision stage
  keeps ``v = keep * L / (K + split * (L - K))`` of each image (at most everything); stage 2 then
  solves its count per row in closed form, ``(keep * N * L - K * n_1) / (L - K)`` for ``N``
  prompt and ``n_1`` surviving tokens, so the rounding of stage 1 is absorbed and the average
  lands on ``keep``.
* LLaVA-NeXT: one selection over the image's whole token sequence (base, crops, newline tokens),
  as DivPrune's official code; Qwen2-VL: the merger's outputs, kept tokens keep their M-RoPE
  positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vtprune.config import (
    ModelInfo,
    VideoBudget,
    check_choice,
    check_fraction,
    check_int,
    register_method,
)
from vtprune.diversity import max_min_diversity
from vtprune.images import ImageView
from vtprune.methods.fastv import text_query_slots
from vtprune.scoring import projected_query_probs
from vtprune.selection import topk_mask, two_stage_count, two_stage_plan
from vtprune.stages import PrefillContext, PrefillStage, VisionStage

DEFAULT_KEEP = 0.111  # 64 of LLaVA-1.5's 576 tokens, the paper's headline budget
DEFAULT_SPLIT = 0.5


@register_method("todre")
@dataclass
class ToDRE(VideoBudget):
    """ToDRE (Li et al., 2025): max-min diversity before the LLM, instruction attention at ``layer``.

    Args:
        keep: layer-average fraction of visual tokens over both stages (default 0.111).
        layer: first decoder layer without the task-irrelevant tokens (default: half the depth).
        split: share of the vision stage's tokens that stage 2 keeps (default 0.5; 0 drops every
            visual token from ``layer`` on). Sets how ``keep`` divides between the stages.
        score: ``"last"`` (the last prompt token's attention row) or ``"mean"`` (all text rows
            after the image).
        init: ``"importance"`` (start the k-center from the highest CLS-attention token) or
            ``"isolated"`` (DivPrune's start; no tower probe).

    Example:
        >>> layer, vision, split = ToDRE(keep=0.25).resolve(ModelInfo(num_layers=32, family="llava"))
        >>> layer, round(vision, 4), split  # (16 * v + 16 * 0.5 * v) / 32 == 0.25
        (16, 0.3333, 0.5)
    """

    layer: int | None = None
    split: float = DEFAULT_SPLIT
    score: str = "last"
    init: str = "importance"

    @classmethod
    def tune_space(cls, info: ModelInfo, keep: float) -> dict[str, list]:
        """Stage 2's layer (early enough for ``keep``), its share and the diversity seed for
        ``vtprune.tune``."""
        n = info.num_layers
        layers = sorted({max(1, round(n * f)) for f in (0.125, 0.25, 0.5)})
        return {"layer": layers, "split": [0.25, 0.5, 0.75], "init": ["importance", "isolated"]}

    def validate(self) -> None:
        if self.layer is not None:
            check_int(self.name, "layer", self.layer)  # its range depends on the depth: checked at resolve
        check_fraction(self.name, "split", self.split, allow_zero=True)
        check_choice(self.name, "score", self.score, ("last", "mean"))
        check_choice(self.name, "init", self.init, ("importance", "isolated"))

    def resolve(self, info: ModelInfo) -> tuple[int, float, float]:
        """``(layer, vision fraction, split)``: where stage 2 acts, what stage 1 keeps, and the share
        of it stage 2 keeps (``split`` unless stage 1 would need more than every token)."""
        keep = DEFAULT_KEEP if self.keep is None else self.keep
        return two_stage_plan(self.name, keep, self.layer, self.split, info.num_layers)

    def stages(self, info: ModelInfo) -> list:
        layer, vision, split = self.resolve(info)
        keep = DEFAULT_KEEP if self.keep is None else self.keep
        return [
            ToDREVisionStage(vision, self.init),
            ToDREPrefillStage(layer, keep, info.num_layers, split, self.score),
        ]


class ToDREVisionStage(VisionStage):
    key = "todre-vision"

    def __init__(self, keep: float, init: str = "importance"):
        self.keep, self.init = keep, init

    def vision_layers(self, adapter) -> list[int]:
        # the importance start reads the CLS row at the feature layer (or its full-attention stand-in)
        if self.init != "importance":
            return []
        return [adapter.score_block(adapter.vision_feature_layer())]

    def expected_count(self, n_image: int) -> int:
        return int(n_image * self.keep + 0.5)

    def pick(self, view: ImageView, budget: int) -> torch.Tensor:
        first = None
        if self.init == "importance":
            first = torch.argmax(view.cls_scores(view.score_layer))  # newlines score -inf
        return max_min_diversity(view.features, budget, first=first)


class ToDREPrefillStage(PrefillStage):
    needs_previous_input = True

    def __init__(self, layer: int, keep: float, num_layers: int, split: float, score: str = "last"):
        self.layer, self.keep, self.num_layers, self.split, self.score = layer, keep, num_layers, split, score
        self.key = f"todre@{layer}"

    def counts(self, n_prompt: torch.Tensor, n_in: torch.Tensor) -> torch.Tensor:
        """Tokens kept per row from ``layer`` on, for ``n_prompt`` image tokens in the prompt and
        ``n_in`` left by the vision stage: the count that makes the layer average ``keep``.

        Example:
            >>> st = ToDREPrefillStage(16, 0.111, 32, 0.5)
            >>> st.counts(torch.tensor([576]), torch.tensor([85])).tolist()  # (16*85 + 16*43) / 32 ~ 64
            [43]
        """
        return two_stage_count(self.keep, n_prompt, n_in, self.layer, self.num_layers)

    def expected_count(self, n_in: int, n_current: int) -> int:
        return min(n_current, int(n_in * self.split + 0.5))

    def select(self, ctx: PrefillContext) -> torch.Tensor:
        if self.score == "last":
            queries = ctx.query_slot.unsqueeze(1)
        else:
            queries = text_query_slots(ctx.visual, ctx.valid)
        attn = ctx.layers[self.layer - 1].self_attn
        probs = projected_query_probs(attn, *ctx.previous_qk, ctx.cos, ctx.sin, ctx.valid, queries)
        scores = probs.sum(1)  # a sum ranks as the mean over the row's queries
        n_prompt = ctx.visual_prompt if ctx.visual_prompt is not None else ctx.visual_in
        return topk_mask(scores, ctx.visual, self.counts(n_prompt, ctx.visual_in))
