"""What every model adapter provides: where things are inside a Hugging Face model.

Adapters locate modules and describe the visual tokens of a batch; they never contain method
logic. The runtime (``vtprune.runtime``) asks an adapter for:

* the multimodal model whose forward sees ``input_ids`` and the image inputs,
* the text decoder (``language_model``) and its decoder layers,
* the visual layout of each image in a batch (how many placeholder tokens, their 2-D grids, and
  which of them are LLaVA-NeXT row-newline tokens),
* positions for decode steps whose caller did not pass ``position_ids``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class GridSegment:
    """A rectangular block of visual tokens inside one image's token run.

    Token ``(r, c)`` of the block sits at ``offset + r * row_stride + c`` within the image's
    tokens. ``row_stride > cols`` when each row is followed by a newline token (LLaVA-NeXT).

    Example:
        >>> GridSegment(offset=576, rows=2, cols=3, row_stride=4).token_index(1, 2)
        582
    """

    offset: int
    rows: int
    cols: int
    row_stride: int
    name: str = "grid"

    def token_index(self, r: int, c: int) -> int:
        return self.offset + r * self.row_stride + c

    def indices(self) -> torch.Tensor:
        r = torch.arange(self.rows).unsqueeze(1) * self.row_stride
        c = torch.arange(self.cols).unsqueeze(0)
        return (self.offset + r + c).flatten()

    @property
    def size(self) -> int:
        return self.rows * self.cols


@dataclass
class ImageLayout:
    """The placeholder tokens of one image (or video) in one batch row.

    ``positions`` are the sequence indices of the image's tokens in its row (at the language
    model's input); ``segments`` tile the image's patch tokens; ``newline`` flags the
    LLaVA-NeXT row-separator tokens (learned ``image_newline`` vectors, not patches).
    """

    row: int
    positions: torch.Tensor
    segments: list[GridSegment]
    newline: torch.Tensor
    extra: dict = field(default_factory=dict)
    source: torch.Tensor | None = None
    crops: int = 1
    vision: dict = field(default_factory=dict)  # tower layer -> captured scores of this image

    @property
    def num_tokens(self) -> int:
        return int(self.positions.numel())


@dataclass(frozen=True)
class ImageSpec:
    """Token structure of one image, before it is placed in a row.

    ``crops`` is how many vision-tower inputs the image used (LLaVA-NeXT: base + grid crops);
    ``source[i]`` says where token ``i`` came from in the tower's output, flattened over
    ``(crop, tower token)`` (CLS included at tower token 0), or -1 for tokens with no tower
    origin (newlines). Vision-side scores (CLS attention) are read through it.
    """

    num_tokens: int
    segments: tuple[GridSegment, ...]
    newline_offsets: tuple[int, ...] = ()
    extra: tuple = ()
    crops: int = 1
    source: torch.Tensor | None = field(default=None, compare=False, hash=False)


class Adapter:
    """Base class: one subclass per model family (see ``vtprune.integrations``)."""

    family: str = "base"
    supported_classes: tuple[str, ...] = ()
    # towers without a CLS token score each patch by the attention it receives (Qwen-VL); the
    # scores are per tower patch, ``patches_per_token`` of them merged into one LM token
    received_scores: bool = False
    patches_per_token: int = 1

    def __init__(self, model: nn.Module):
        self.model = model
        self.outer = model if hasattr(model, "model") and hasattr(model, "lm_head") else None
        self.mm_model = model.model if self.outer is not None else model
        self.language_model = self.mm_model.language_model
        self.layers = self.language_model.layers
        self.text_config = self.language_model.config
        self.config = self.mm_model.config

    # -- classification -------------------------------------------------------------------
    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return type(model).__name__ in cls.supported_classes

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def vision_tower(self) -> nn.Module:
        return self.mm_model.vision_tower

    def visual_token_ids(self) -> tuple[int, ...]:
        return (int(self.config.image_token_id),)

    def vision_attention(self, layer: int) -> nn.Module:
        """The attention module of vision-tower layer ``layer`` (for CLS-attention probes)."""
        raise NotImplementedError(f"{self.family}: vision-tower attention probes are not available")

    @property
    def vision_layers_count(self) -> int:
        raise NotImplementedError

    def vision_feature_layer(self) -> int:
        """Index of the tower layer whose output becomes the image features."""
        raise NotImplementedError

    def tower_projector(self) -> nn.Module | None:
        """The module mapping one tower token's feature-layer hidden state to its language-model
        input (LLaVA's ``multi_modal_projector``), or ``None`` where the family has no such
        per-token map (Qwen2-VL's merger takes 2x2 patches)."""
        return None

    def score_block(self, layer: int) -> int:
        """The tower layer whose scores a method reads when its default would be ``layer``
        (towers mixing window and full attention move it to a full-attention block)."""
        return layer

    def vision_patch_order(self, grid_thw, kwargs: dict) -> torch.Tensor | None:
        """Permutation of tower patches inside the tower's blocks, if they run out of token order
        (``blocks[i] = patches[order[i]]``); ``None`` when the blocks see the token order."""
        return None

    def check_call(self, call: dict) -> None:
        """Refuse a prefill call whose inputs would silently mislead the model (family-specific)."""

    # -- visual layout --------------------------------------------------------------------
    def image_specs(self, call: dict) -> list[ImageSpec]:
        """Token structure of every image in the call, in the order HF scatters features."""
        raise NotImplementedError

    def required_call_params(self) -> tuple[str, ...]:
        """Family-specific parameters of the multimodal forward that the hooks read."""
        return ()

    def encoder_methods(self) -> tuple[str, ...]:
        """Names of the multimodal model's encoder methods whose outputs carry image features."""
        return ("get_image_features",)

    def layouts(self, input_ids: torch.Tensor, specs: list[ImageSpec]) -> list[list[ImageLayout]]:
        """Per batch row, the layouts of its images, from placeholder positions and specs.

        HF writes image features with ``masked_scatter`` in row-major order of the placeholder
        tokens, so image ``i`` of the batch takes the next ``num_tokens`` placeholders.
        """
        is_visual = torch.zeros_like(input_ids, dtype=torch.bool)
        for tid in self.visual_token_ids():
            is_visual |= input_ids == tid
        rows, cols = is_visual.nonzero(as_tuple=True)
        rows, cols = rows.cpu(), cols.cpu()
        specs = specs if rows.numel() else []
        total = sum(s.num_tokens for s in specs)
        if total != rows.numel():
            raise ValueError(
                f"vtprune: the prompt holds {rows.numel()} image placeholder tokens but the image "
                f"inputs describe {total}; check that the processor and the model configuration agree"
            )
        out: list[list[ImageLayout]] = [[] for _ in range(input_ids.shape[0])]
        start = 0
        for spec in specs:
            r = rows[start : start + spec.num_tokens]
            if (r != r[0]).any():
                raise ValueError("vtprune: an image's placeholder tokens span two batch rows")
            newline = torch.zeros(spec.num_tokens, dtype=torch.bool)
            if spec.newline_offsets:
                newline[list(spec.newline_offsets)] = True
            out[int(r[0])].append(
                ImageLayout(
                    row=int(r[0]),
                    positions=cols[start : start + spec.num_tokens],
                    segments=list(spec.segments),
                    newline=newline,
                    extra=dict(spec.extra),
                    source=spec.source,
                    crops=spec.crops,
                )
            )
            start += spec.num_tokens
        return out

    # -- positions ------------------------------------------------------------------------
    def prefill_position_ids(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """What the text model would use when the caller passes no ``position_ids``."""
        b, n = inputs_embeds.shape[:2]
        return torch.arange(n, device=inputs_embeds.device).unsqueeze(0).expand(b, n)

    def decode_position_ids(
        self, seen: int, q_len: int, batch: int, device, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Original positions of new tokens when ``seen`` original tokens precede them (what the
        text model does without ``position_ids``: it counts cached tokens, padding included)."""
        pos = torch.arange(seen, seen + q_len, device=device)
        return pos.unsqueeze(0).expand(batch, q_len)
