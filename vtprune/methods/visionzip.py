"""VisionZip: dominant tokens by CLS attention, the rest merged into a few contextual tokens.

Per partition (the image for LLaVA-1.5 and Qwen2-VL; the base image and *each* crop for
LLaVA-NeXT, so budgets are stated per crop): the ``dominant`` tokens with the highest CLS
attention at the feature layer stay as they are. Of the others, ``contextual`` evenly spaced
ones become merge targets; every remaining token joins the target whose tower key is most
similar (cosine, keys averaged over heads) and each target's language-model input becomes the
mean of its group. The papers' settings 54+10 / 108+20 / 162+30 give 64 / 128 / 192 tokens per
576; ``keep`` splits its budget in the same 54:10 proportion.

Decisions: merging happens on the projected features (the language model's input), not
before the projector, because the placeholder count is fixed by the prompt; merged tokens sit
at their target's original position. Qwen2-VL uses the received-attention substitute score.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vtprune.config import MethodConfig, ModelInfo, check_vision_layer, register_method
from vtprune.integrations.base import ImageLayout
from vtprune.methods.hired import token_scores
from vtprune.stages import VisionContext, VisionStage

DOMINANT_SHARE = 54 / 64


@register_method("visionzip")
@dataclass
class VisionZip(MethodConfig):
    """VisionZip (Yang et al., 2024).

    Args:
        dominant: dominant tokens per partition (image, or LLaVA-NeXT base/crop).
        contextual: contextual (merged) tokens per partition.
        keep: alternatively, the kept fraction of each partition, split 54:10.
        layer: tower layer whose CLS attention and keys are used (default: the feature layer).

    Example:
        >>> VisionZip(dominant=54, contextual=10).per_partition(576)
        (54, 10)
    """

    dominant: int | None = None
    contextual: int | None = None
    layer: int | None = None

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

    def per_partition(self, n: int) -> tuple[int, int]:
        """(dominant, contextual) for a partition of ``n`` tokens."""
        if self.keep is None and self.dominant is None and self.contextual is None:
            return min(n, 54), min(max(0, n - 54), 10)
        if self.keep is not None:
            k = int(self.keep * n + 0.5)
            d = min(k, int(k * DOMINANT_SHARE + 0.5))
            return d, k - d
        d = min(n, self.dominant or 0)
        return d, min(n - d, self.contextual or 0)

    def stages(self, info: ModelInfo) -> list:
        check_vision_layer(self.name, "layer", self.layer, info)
        return [VisionZipStage(self)]


class VisionZipStage(VisionStage):
    key = "visionzip"
    needs_keys = True

    def __init__(self, cfg: VisionZip):
        self.cfg = cfg

    def vision_layers(self, adapter) -> list[int]:
        default = adapter.score_block(adapter.vision_feature_layer())
        self.layer = default if self.cfg.layer is None else self.cfg.layer
        return [self.layer]

    def expected_count(self, n_image: int) -> int:
        d, c = self.cfg.per_partition(n_image)
        return d + c

    def select(self, ctx: VisionContext) -> torch.Tensor:
        keep = torch.zeros_like(ctx.visual)
        for row in ctx.layouts:
            for img in row:
                scores = token_scores(img, self.layer).cpu()
                keys = _token_keys(img, self.layer)
                keep_local = img.newline.clone()
                for part in _partitions(img):
                    d, c = self.cfg.per_partition(part.numel())
                    kept, groups = zip_partition(scores[part], keys[part], d, c)
                    keep_local[part[kept]] = True
                    pos = img.positions.to(ctx.embeds.device)
                    for target, members in groups:
                        vec = ctx.embeds[img.row, pos[part[members]]].mean(0)
                        ctx.replace(img.row, pos[part[target]], vec)
                keep[img.row, img.positions[keep_local].to(keep.device)] = True
        return keep


def _partitions(img: ImageLayout) -> list[torch.Tensor]:
    """Image-token indices of each partition: one per tower crop (newlines excluded)."""
    patch = torch.nonzero(~img.newline).flatten()
    if img.crops == 1 or img.source is None:
        return [patch]
    per_crop = 1 + img.extra["crop_side"] ** 2  # tower tokens per crop, CLS included
    crop = img.source[patch] // per_crop
    return [patch[crop == j] for j in range(img.crops) if bool((crop == j).any())]


def _token_keys(img: ImageLayout, layer: int) -> torch.Tensor:
    keys = img.vision[layer]["keys"]
    if img.source is None or "received" in img.vision[layer]:
        return keys.reshape(img.num_tokens, -1, keys.shape[-1]).mean(1).cpu()  # 2x2 merged patches
    flat = keys.reshape(-1, keys.shape[-1])
    return flat[img.source.clamp(min=0).to(flat.device)].cpu()


def zip_partition(scores: torch.Tensor, keys: torch.Tensor, dominant: int, contextual: int):
    """Dominant + contextual selection within one partition (indices local to it).

    Returns the kept indices and, for each contextual target, ``(target, members)`` where
    members (the target included) are averaged into the target.

    Example:
        >>> s = torch.tensor([9.0, 1, 2, 8, 3, 4])
        >>> k = torch.tensor([[1.0, 0], [0, 1], [0, 1], [1, 0], [1, 0.1], [0.1, 1]])
        >>> kept, groups = zip_partition(s, k, dominant=2, contextual=2)
        >>> kept.tolist(), [(t, m.tolist()) for t, m in groups]
        ([0, 1, 3, 4], [(1, [1, 2, 5]), (4, [4])])
    """
    n = scores.numel()
    dominant = min(dominant, n)
    order = torch.sort(scores, descending=True, stable=True).indices
    dom = order[:dominant].sort().values
    rest = order[dominant:].sort().values
    contextual = min(contextual, rest.numel())
    if contextual == 0:
        return dom, []
    pick = torch.div(torch.arange(contextual) * rest.numel(), contextual, rounding_mode="floor")
    targets = rest[pick]
    others = rest[~torch.isin(rest, targets)]
    kn = torch.nn.functional.normalize(keys.float(), dim=-1)
    nearest = (kn[others] @ kn[targets].T).argmax(1) if others.numel() else others
    groups = []
    for j, t in enumerate(targets.tolist()):
        members = torch.cat([torch.tensor([t]), others[nearest == j]]).sort().values
        groups.append((t, members))
    return torch.cat([dom, targets]).sort().values, groups
