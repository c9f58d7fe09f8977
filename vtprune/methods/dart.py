"""DART: keep the visual tokens that duplicate a few pivot tokens least, before decoder layer K.

Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models: Duplication
Matters More" (EMNLP 2025). Attention-free: it reads the keys of layer ``K-1`` (the runtime keeps
that layer's k projection, as for FastV) and the hidden states entering layer K, so SDPA /
FlashAttention stay on.

Before layer K (default 2), per row:

1. pivots: the ``pivot_image`` visual tokens and the ``pivot_text`` text tokens after the first
   visual token with the largest L1 norm of their layer ``K-1`` keys (after RoPE, all key heads
   concatenated);
2. the image pivots are kept; then each pivot in turn (image pivots by descending key norm, then
   text pivots the same way) claims its quota of the remaining visual tokens with the lowest
   cosine similarity to it, measured on the hidden states entering layer K after the decoder's
   final norm (``vtprune.diversity.pivot_deduplication``);
3. kept tokens keep their original positions (Qwen2-VL's 3-D M-RoPE ids too; the runtime gathers
   them).

Departures from the official code, each deliberate:

* **Budget.** The official code gives every pivot ``MAX // (pivots)`` tokens and keeps the image
  pivots on top, so it retains ``MAX + |image pivots|`` (132 for "128"), up to ``pivots - 1`` fewer
  when ``MAX`` is not a multiple. Here the kept count is exactly the budget ``round(ratio * N)``:
  the image pivots count within it, and the rest is split over the pivots as evenly as possible
  (the first ``rest % pivots`` pivots take one more). ``keep`` is the layer-average fraction,
  converted like FastV: ``keep = (K + (L - K) * ratio) / L``; a budget below ``pivot_image`` keeps
  only that many image pivots.
* **Pivot order.** The official loop walks a Python ``set`` of the pivot indices (hash order,
  effectively arbitrary); here the order is the one of the official list before it becomes a set
  (image pivots, then text pivots, each by descending key norm). The order matters only where two
  pivots would claim the same token.
* **Several images per row** are one span, as the official LLaVA-NeXT path treats its whole
  image sequence; "text after the image" is the text after the row's first visual token.
* Norms and cosines are computed in float32 (the official code uses the model's dtype); ties go
  to the earlier token.
* Official ``K = 2`` (the Qwen2-VL script; LightCompress's example uses 5), 4 + 4 pivots.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vtprune.config import MethodConfig, ModelInfo, check_choice, check_int, register_method
from vtprune.diversity import pivot_deduplication
from vtprune.methods.fastv import resolve_layer_ratio, validate_layer_ratio
from vtprune.scoring import apply_rope, head_norms
from vtprune.search import layer_candidates
from vtprune.selection import count_for_fraction
from vtprune.stages import PrefillContext, PrefillStage

DEFAULT_RATIO = 128 / 576  # the official LLaVA-1.5 setting: 128 of 576 tokens after layer K
PIVOT_SCORES = ("k_norm",)


@register_method("dart")
@dataclass
class DART(MethodConfig):
    """DART (Wen et al., 2025): pivots by key norm, then the tokens least duplicating them.

    Args:
        layer: K, the first decoder layer that sees the pruned sequence (default 2, lowered
            automatically when ``keep`` is too small for it on a shallow model).
        ratio: fraction of visual tokens kept from layer K on (default 128/576, the official
            LLaVA setting); the image pivots count within it.
        keep: target layer-average fraction; resolves ``ratio`` (give one of ``keep``/``ratio``).
        pivot_image: visual pivot tokens (default 4).
        pivot_text: text pivot tokens, from the text after the image (default 4).
        pivot_score: how pivots are ranked: ``"k_norm"``, the L1 norm of the layer ``K-1`` keys.

    Example:
        >>> layer, ratio = DART(keep=0.25).resolve(ModelInfo(num_layers=32, family="llava"))
        >>> layer, round(ratio * 576)  # (2 * 576 + 30 * n) / 32 == 0.25 * 576
        (2, 115)
    """

    layer: int | None = None
    ratio: float | None = None
    pivot_image: int = 4
    pivot_text: int = 4
    pivot_score: str = "k_norm"

    def validate(self) -> None:
        validate_layer_ratio(self)
        check_int(self.name, "pivot_image", self.pivot_image, minimum=0)
        check_int(self.name, "pivot_text", self.pivot_text, minimum=0)
        if self.pivot_image + self.pivot_text == 0:
            raise ValueError("dart: 'pivot_image' and 'pivot_text' are both 0; allowed: at least one pivot")
        check_choice(self.name, "pivot_score", self.pivot_score, PIVOT_SCORES)

    @classmethod
    def tune_space(cls, info: ModelInfo, keep: float) -> dict[str, list]:
        """``layer`` (early enough for ``keep``) and the pivot counts for ``vtprune.tune``."""
        layers = [x for x in layer_candidates(info.num_layers) if x < keep * info.num_layers]
        return {"layer": layers or [1], "pivot_image": [2, 4, 8], "pivot_text": [0, 4]}

    def resolve(self, info: ModelInfo) -> tuple[int, float]:
        return resolve_layer_ratio(
            self.name, self.layer, self.keep, self.ratio, info.num_layers, DEFAULT_RATIO
        )

    def stages(self, info: ModelInfo) -> list:
        layer, ratio = self.resolve(info)
        return [DARTStage(layer, ratio, self.pivot_image, self.pivot_text, self.pivot_score)]


class DARTStage(PrefillStage):
    needs_previous_input = True  # the keys of layer K-1

    def __init__(self, layer: int, ratio: float, pivot_image: int, pivot_text: int, pivot_score: str):
        self.layer, self.ratio = layer, ratio
        self.pivot_image, self.pivot_text, self.pivot_score = pivot_image, pivot_text, pivot_score
        self.key = f"dart@{layer}"

    def expected_count(self, n_in: int, n_current: int) -> int:
        return int(count_for_fraction(torch.tensor([n_in]), self.ratio))

    @torch.no_grad()
    def select(self, ctx: PrefillContext) -> torch.Tensor:
        if ctx.final_norm is None:
            raise NotImplementedError(
                "dart: this decoder has no final norm ('norm') to measure similarity after"
            )
        visual = ctx.visual
        text = visual.long().cummax(1).values.bool() & ~visual & ctx.valid  # text after the image
        scores = self.pivot_scores(ctx)
        budget = count_for_fraction(ctx.visual_in, self.ratio).to(visual.device).minimum(visual.sum(1))
        image_pivots = top_slots(scores, visual, budget.clamp(max=self.pivot_image), self.pivot_image)
        text_pivots = top_slots(scores, text, text.sum(1), self.pivot_text)
        pivots = torch.cat([image_pivots, text_pivots], 1)
        kept = slot_mask(image_pivots, visual.shape[1])
        active = pivots >= 0
        share = (budget - kept.sum(1)).unsqueeze(1)
        count = active.sum(1, keepdim=True).clamp(min=1)
        rank = active.long().cumsum(1) - 1
        quota = torch.where(active, share // count + (rank < share % count).long(), 0)
        features = ctx.final_norm(ctx.hidden)
        return kept | pivot_deduplication(features, pivots, visual & ~kept, quota)

    def pivot_scores(self, ctx: PrefillContext) -> torch.Tensor:
        """``[B, L]`` score of each present slot; the highest become pivots."""
        if ctx.previous_qk is None or ctx.previous_qk[1] is None:
            raise RuntimeError(
                f"dart: the keys of layer {self.layer - 1} were not captured (another stage "
                f"removed tokens before layer {self.layer}); place dart at its own layer"
            )
        attn = ctx.layers[self.layer - 1].self_attn
        k_out = ctx.previous_qk[1]
        b, n, _ = k_out.shape
        k = head_norms(attn, None, k_out.view(b, n, -1, attn.head_dim).transpose(1, 2))[1]  # Qwen3: k_norm
        k = apply_rope(k, ctx.cos.expand(b, -1, -1), ctx.sin.expand(b, -1, -1))
        # L1 norm over all key heads (the official code repeats them for GQA: that only scales it)
        return k.float().abs().sum((1, 3))


def top_slots(scores: torch.Tensor, flags: torch.Tensor, count: torch.Tensor, width: int) -> torch.Tensor:
    """``[B, width]`` slots of each row's ``count[b]`` highest-scoring flagged slots, best first
    (-1 padded; ties to the earlier slot).

    Example:
        >>> s = torch.tensor([[0.5, 0.9, 0.1, 0.7]])
        >>> top_slots(s, torch.tensor([[True, True, True, False]]), torch.tensor([2]), 3).tolist()
        [[1, 0, -1]]
    """
    masked = scores.float().masked_fill(~flags, float("-inf"))
    order = torch.sort(masked, dim=1, descending=True, stable=True).indices[:, :width]
    ok = flags.gather(1, order) & (torch.arange(order.shape[1], device=flags.device) < count.unsqueeze(1))
    out = torch.where(ok, order, -1)
    return torch.nn.functional.pad(out, (0, width - out.shape[1]), value=-1)


def slot_mask(slots: torch.Tensor, length: int) -> torch.Tensor:
    """``[B, length]`` boolean mask of the given slots (``-1`` entries ignored)."""
    mask = torch.zeros(slots.shape[0], length + 1, dtype=torch.bool, device=slots.device)
    mask.scatter_(1, torch.where(slots >= 0, slots, length), True)
    return mask[:, :length]
