"""CDPruner: keep the image tokens a conditional DPP picks (diversity weighted by instruction relevance).

Zhang et al., "Beyond Attention or Similarity: Maximizing Conditional Diversity for Token Pruning
in MLLMs" (NeurIPS 2025), github.com/Theia-4869/CDPruner. Attention-free: it reads only the
language model's input embeddings (projector outputs of the image, embeddings of the prompt),
so SDPA / FlashAttention stay on and no tower scores are captured.

Per image, ``round(keep * tokens)`` tokens are chosen by greedy DPP MAP inference
(``vtprune.diversity.dpp_greedy_map``) with kernel ``L = diag(q) S diag(q)``:

* ``S``: cosine similarity of the image's projector outputs (float32), as the official code.
* Relevance ``r_j``: the mean over the instruction tokens of the cosine between token ``j``'s
  projector output and the instruction token's **input embedding** (``ImageView.instruction_embeds``:
  the row's text after its last image, or all its text where the image ends the prompt), then
  min-max normalised over the image, ``(r - min + 1e-6) / (max - min)``. **A substitute**: the
  official LLaVA code uses CLIP's text tower on the question against CLIP's projected image
  embeddings, and Hugging Face LLaVA checkpoints ship no CLIP text tower. The input-embedding
  relevance is what the OpenVINO port uses for Qwen2-VL (the paper's Qwen numbers have no
  official code). A prompt with no text tokens at all gives ``q = 1`` (plain DPP diversity).
  ``relevance=`` picks the source (``vtprune.relevance``): ``"tokens"`` (default, the mean of the
  per-token cosines above), ``"last"`` (cosine to the last instruction token's embedding) or
  ``"centroid"`` (cosine to the mean instruction embedding).
* Sign: the official code uses the **negative** cosine (``(-relevance).mean``), which the
  authors say they observed for CLIP in LLaVA (issues #9, #14, #19); the OpenVINO port keeps it
  for LLM embeddings. ``negate=True`` (default) follows the code; ``negate=False`` uses ``+cos``.
* Quality: ``quality="code"`` (default) uses the normalised relevance itself, as the official
  code; ``quality="paper"`` uses the paper's ``exp(alpha * r)``, ``alpha = theta / (2 (1 - theta))``
  (commented out in the official code; the OpenVINO port uses it with ``theta=0.5``).
* LLaVA-NeXT: the official code selects per crop before unpadding (the same count per crop) and
  drops every row-newline token (it removes ``unpad``). Here the selection runs after packing,
  over the image's whole patch sequence (relevance normalised over the whole image, as the
  official code normalises over all crops together); newline tokens are not candidates and are
  dropped, as there (kept only when the budget exceeds the patch tokens, e.g. ``keep=1``).
  ``per_crop=True`` splits the budget over the base image and the crops by size (largest
  remainders) and selects within each.
* Qwen2-VL: the tokens are the merger's outputs; kept tokens keep their 3-D M-RoPE positions.
* Default ``keep = 0.111``: 64 of LLaVA-1.5's 576 tokens, the paper's and Cen-Prune's headline budget.
* Where the kernel's rank is smaller than the budget (hidden size below the kept count), the
  greedy continues by the largest remaining conditional variance (see ``dpp_greedy_map``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vtprune.config import ModelInfo, VideoBudget, _invalid, check_bool, check_choice, register_method
from vtprune.diversity import dpp_greedy_map
from vtprune.images import ImageView
from vtprune.recycling import check_recycle
from vtprune.relevance import SOURCES, instruction_relevance
from vtprune.selection import split_budget
from vtprune.stages import VisionStage

DEFAULT_KEEP = 0.111  # 64 of 576
QUALITIES = ("code", "paper")


@register_method("cdpruner")
@dataclass
class CDPruner(VideoBudget):
    """CDPruner (Zhang et al., 2025): conditional DPP over the projector outputs, per image.

    Args:
        keep: kept fraction of each image's tokens (default 0.111: 64 of 576).
        quality: ``"code"`` (relevance as the DPP quality, the official code) or ``"paper"``
            (``exp(alpha * relevance)``, ``alpha = theta / (2 (1 - theta))``).
        theta: the paper's relevance weight in ``[0, 1)`` (``quality="paper"`` only; 0: no relevance).
        negate: relevance is the negative cosine to the instruction (the official code) if True.
        relevance: the relevance source (``vtprune.relevance.SOURCES``): ``"tokens"`` (mean of
            the cosines to each instruction token's input embedding, default), ``"last"`` (cosine
            to the last instruction token) or ``"centroid"`` (cosine to the mean instruction
            embedding). HF checkpoints ship no CLIP text tower, so these input-embedding sources
            stand in for the official CLIP-text relevance.
        recycle: ``"none"`` (default), ``"nearest"`` (fold each dropped token into its most
            similar kept token, mean of the group) or ``"clusters"`` (a tenth of the budget goes
            to DPC-kNN cluster means of the dropped tokens, at their centres; ``vtprune.recycling``).
        per_crop: LLaVA-NeXT only: select within the base image and each crop (budget split by size).

    Example:
        >>> CDPruner(keep=0.25, quality="paper", theta=0.5).theta
        0.5
    """

    quality: str = "code"
    theta: float = 0.5
    negate: bool = True
    per_crop: bool = False
    relevance: str = "tokens"
    recycle: str = "none"

    @classmethod
    def tune_space(cls, info: ModelInfo, keep: float) -> dict[str, list]:
        """The relevance source, its weight (``theta``, paper quality) and its sign for ``vtprune.tune``."""
        return {
            "quality": ["code", "paper"],
            "theta": [0.2, 0.5, 0.8],
            "relevance": list(SOURCES),
            "negate": [True, False],
        }

    def validate(self) -> None:
        check_choice(self.name, "quality", self.quality, QUALITIES)
        t = self.theta
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t < 1:
            raise _invalid(self.name, "theta", t, "a number in [0, 1)")
        check_bool(self.name, "negate", self.negate)
        check_bool(self.name, "per_crop", self.per_crop)
        check_choice(self.name, "relevance", self.relevance, SOURCES)
        check_recycle(self.name, self.recycle)

    def stages(self, info: ModelInfo) -> list:
        keep = DEFAULT_KEEP if self.keep is None else self.keep
        alpha = None if self.quality == "code" else self.theta / (2 * (1 - self.theta))
        stage = CDPrunerStage(keep, alpha, self.negate, self.per_crop, self.relevance)
        stage.recycle = self.recycle
        return [stage]


class CDPrunerStage(VisionStage):
    key = "cdpruner"
    reads_prompt = True  # the relevance reads the instruction tokens

    def __init__(
        self,
        keep: float,
        alpha: float | None = None,
        negate: bool = True,
        per_crop: bool = False,
        relevance: str = "tokens",
    ):
        self.keep, self.alpha, self.negate, self.per_crop = keep, alpha, negate, per_crop
        self.relevance = relevance

    def expected_count(self, n_image: int) -> int:
        return int(n_image * self.keep + 0.5)

    def pick(self, view: ImageView, budget: int) -> torch.Tensor:
        feats = view.features
        patches = view.patch_indices
        if budget >= patches.numel():  # everything but (some) newlines
            extra = view.newline_indices[: budget - patches.numel()]
            return torch.cat([patches, extra]).sort().values
        text = view.instruction_embeds if view.instruction is not None else feats[:0]
        r = instruction_relevance(feats[patches], text, self.negate, self.relevance)
        q = torch.ones(patches.numel(), device=feats.device) if r is None else r
        if self.alpha is not None:
            q = torch.exp(self.alpha * q)
        quality = torch.zeros(view.num_tokens, device=feats.device).index_copy_(0, patches, q)
        parts = view.partitions()
        if not self.per_crop or len(parts) == 1:
            members = [patches]
            shares = [budget]
        else:
            members = [torch.cat([p, c]).sort().values for p, c in parts]
            shares = split_budget(budget, [m.numel() for m in members])
        chosen = [m[dpp_greedy_map(_cosine(feats[m]), quality[m], k)] for m, k in zip(members, shares)]
        return torch.cat(chosen).sort().values


def _cosine(x: torch.Tensor) -> torch.Tensor:
    xn = torch.nn.functional.normalize(x.detach().float(), dim=-1)
    return xn @ xn.T
