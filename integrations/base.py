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

import torch
from torch import nn

# the image-structure types live in the core; re-exported here for code that imported them from here
from vtprune.images import GridSegment, ImageLayout, ImageSpec, ImageView

__all__ = ["Adapter", "GridSegment", "ImageLayout", "ImageSpec", "ImageView"]


class Adapter:
    """Base class: one subclass per model family (see ``vtprune.integrations``)."""

    family: str = "base"
    supported_classes: tuple[str, ...] = ()
    #: the tower has a CLS token (else vision-stage scores use the received-attention substitute)
    has_cls: bool = True
    #: tower patches merged into one language-model token (Qwen2-VL: 2x2)
    patches_per_token: int = 1
    #: name of a language-model method that adds per-visual-token features to the hidden states
    #: between decoder layers, called as ``fn(hidden_states, visual_pos_masks, visual_embeds)``
    #: (Qwen3-VL's DeepStack); the runtime re-indexes its arguments onto the kept tokens
    injection_method: str | None = None

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

    @property
    def injection_layers(self) -> list[int]:
        """Decoder layers after which :attr:`injection_method` adds features (none by default)."""
        return []

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

    @property
    def tower_tokens_per_crop(self) -> int | None:
        """Tower tokens per crop, CLS included (how captured tower rows split into crops)."""
        return None

    def image_view(self, layout: ImageLayout, **kw) -> ImageView:
        """One image as a vision-stage method sees it, with this family's tower knowledge."""
        return ImageView(
            layout,
            patches_per_token=self.patches_per_token,
            has_cls=self.has_cls,
            feature_layer=self.vision_feature_layer(),
            tower_tokens_per_crop=self.tower_tokens_per_crop,
            tower_layers=self.vision_layers_count,
            projector=self.tower_projector(),
            score_block=self.score_block,
            **kw,
        )

    def score_block(self, layer: int) -> int:
        """The tower layer whose scores a method reads when its default would be ``layer``
        (towers mixing window and full attention move it to a full-attention block)."""
        return layer

    def vision_patch_order(self, grid_thw, kwargs: dict) -> torch.Tensor | None:
        """Permutation of tower patches inside the tower's blocks, if they run out of token order
        (``blocks[i] = patches[order[i]]``); ``None`` when the blocks see the token order."""
        return None

    def check_tower_stage(self, method: str) -> None:
        """Refuse a tower stage (pruning between vision-tower layers) this family cannot run."""
        raise NotImplementedError(
            f"vtprune: {method} prunes inside the vision tower, which is supported on LLaVA-1.5, "
            f"LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL and Qwen3-VL so far, not on {self.family}"
        )

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

    def media_token_ids(self) -> dict[str, tuple[int, ...]]:
        """Placeholder token ids per kind of media (``"image"``, ``"video"``): HF scatters each
        kind's features into that kind's placeholders separately."""
        return {"image": self.visual_token_ids()}

    def layouts(
        self, input_ids: torch.Tensor, specs: list[ImageSpec], vision: list[dict] | None = None
    ) -> list[list[ImageLayout]]:
        """Per batch row, the layouts of its images and videos (in prompt order), from placeholder
        positions and specs (with ``vision[i]``, spec ``i``'s captured tower scores, attached).

        HF writes each kind's features with ``masked_scatter`` in row-major order of that kind's
        placeholder tokens, so the ``i``-th image spec takes the next ``num_tokens`` image
        placeholders and the ``i``-th video spec the next video placeholders, however the two
        kinds interleave in the prompt.
        """
        out: list[list[ImageLayout]] = [[] for _ in range(input_ids.shape[0])]
        for kind, ids in self.media_token_ids().items():
            mine = [i for i, s in enumerate(specs) if s.kind == kind]
            is_kind = torch.zeros_like(input_ids, dtype=torch.bool)
            for tid in ids:
                is_kind |= input_ids == tid
            rows, cols = is_kind.nonzero(as_tuple=True)
            rows, cols = rows.cpu(), cols.cpu()
            mine = mine if rows.numel() else []
            total = sum(specs[i].num_tokens for i in mine)
            if total != rows.numel():
                raise ValueError(
                    f"vtprune: the prompt holds {rows.numel()} {kind} placeholder tokens but the {kind} "
                    f"inputs describe {total}; check that the processor and the model configuration agree"
                )
            start = 0
            for i in mine:
                spec = specs[i]
                r = rows[start : start + spec.num_tokens]
                if (r != r[0]).any():
                    raise ValueError(f"vtprune: an {kind}'s placeholder tokens span two batch rows")
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
                        vision=vision[i] if vision is not None else {},
                        kind=spec.kind,
                        frames=spec.frames,
                        taps=spec.taps,
                    )
                )
                start += spec.num_tokens
        for row in out:
            row.sort(key=lambda img: int(img.positions[0]))
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
