"""Image structure, and the per-image view a vision-stage method reads.

Adapters describe each image of a batch with these types (``ImageSpec`` before it is placed in a
row, ``ImageLayout`` once its placeholder positions are known) and hand each image to a
vision-stage method as an :class:`ImageView`. Everything model-specific a method may need (which
tower layer the features come from, whether the tower has a CLS token, how many tower patches
make one language-model token, how tower crops are laid out) is filled in by the adapter; the
view answers by name, so methods never test for a model family or a tensor shape.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch


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
    kind: str = "image"  # "image" or "video" (which placeholder id, which tower run)
    frames: int = 1  # video: temporal patches (Qwen: 2-frame tubelets), one segment each
    taps: tuple | None = None  # (index [n, k], weight [n, k]): see ImageSpec

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

    ``taps`` (LLaVA-OneVision) says how token ``i`` was *mixed* from tower tokens where the model
    resamples the grid (``anyres_max`` downscaling, video pooling, both bilinear):
    ``(index [n, k], weight [n, k])`` over the same flattened ``(crop, tower token)`` axis, zero
    weights for newlines. Tower-side tensors of such a token are the same weighted sums of its
    tower tokens' tensors; ``source`` then holds its heaviest tap (its crop).
    """

    num_tokens: int
    segments: tuple[GridSegment, ...]
    newline_offsets: tuple[int, ...] = ()
    extra: tuple = ()
    crops: int = 1
    source: torch.Tensor | None = field(default=None, compare=False, hash=False)
    kind: str = "image"  # "image" or "video": which placeholder tokens it fills
    frames: int = 1  # video: temporal patches, laid out one after another (one segment each)
    taps: tuple | None = field(default=None, compare=False, hash=False)


@dataclass
class ImageView:
    """One image (LLaVA-NeXT: its base image and crops; Qwen2-VL: all its frames) as a
    vision-stage method sees it. Token indices are local to the image (``0 .. num_tokens - 1``).

    Built by ``Adapter.image_view`` at prefill; tests may build one by hand. What it offers:

    * :attr:`features`: the image's language-model input embeddings (projector outputs) ``[n, D]``;
    * :meth:`cls_scores`, :meth:`keys`, :meth:`tower_features`, :meth:`tower_hidden`: tower-side
      tensors at a tower layer asked for by number (``feature_layer`` is the one LLaVA's features
      come from), mapped to the image's tokens (Qwen2-VL: averaged over the patches merged into
      a token);
    * :meth:`partitions` / :attr:`crop_index`: the tower crops (LLaVA-NeXT base image and crops);
      ``segments`` the 2-D grids, ``newline`` the LLaVA-NeXT row-newline flags;
    * :attr:`instruction_ids` / :attr:`instruction_embeds`: the prompt's instruction tokens (the
      row's real text tokens after its last image token; all its text tokens if the image ends
      the prompt), with their input embeddings.

    Example:
        >>> lay = ImageLayout(0, torch.arange(3, 7), [GridSegment(0, 2, 2, 2)], torch.zeros(4, dtype=torch.bool))
        >>> view = ImageView(lay, embeds=torch.arange(10.0).unsqueeze(1))
        >>> view.num_tokens, view.features.flatten().tolist()
        (4, [3.0, 4.0, 5.0, 6.0])
    """

    layout: ImageLayout
    index: int = 0  # the image's place among its row's images
    embeds: torch.Tensor | None = None  # [L, D] the row's language-model inputs
    instruction: torch.Tensor | None = None  # [L] bool, the row's instruction tokens
    input_ids: torch.Tensor | None = None  # [L]
    patches_per_token: int = 1  # tower patches merged into one language-model token
    has_cls: bool = True  # the tower has a CLS token (else: the received-attention substitute)
    feature_layer: int = -1  # tower layer whose output the features come from
    tower_tokens_per_crop: int | None = None  # tower tokens per crop, CLS included
    tower_layers: int | None = None  # depth of the vision tower
    projector: Callable[[torch.Tensor], torch.Tensor] | None = None  # tower feature -> LM input
    # the tower layer a method reads scores from when its default is a layer (towers mixing
    # window and full attention, Qwen2.5-VL: a full-attention block); ``None``: that layer itself
    score_block: Callable[[int], int] | None = None
    _cache: dict = field(default_factory=dict, repr=False)

    # -- structure ------------------------------------------------------------------------
    @property
    def row(self) -> int:
        return self.layout.row

    @property
    def num_tokens(self) -> int:
        return self.layout.num_tokens

    @property
    def segments(self) -> list[GridSegment]:
        return self.layout.segments

    @property
    def extra(self) -> dict:
        return self.layout.extra

    @property
    def kind(self) -> str:
        """``"image"`` or ``"video"``."""
        return self.layout.kind

    @property
    def frames(self) -> int:
        """Frames of a video (Qwen: temporal patches, each a 2-frame tubelet); 1 for an image.
        Frame ``f`` is ``segments[f]``."""
        return self.layout.frames

    @property
    def crops(self) -> int:
        return self.layout.crops

    def frame_views(self) -> list[ImageView]:
        """One view per frame of a video (frame ``f`` is ``segments[f]`` and the tokens up to the
        next frame), each a one-frame clip with its own slice of the tower scores; ``[self]`` for
        an image. Used for the per-frame budget (``video_budget="frame"``).

        Example:
            >>> segs = [GridSegment(0, 1, 2, 2), GridSegment(2, 1, 2, 2)]
            >>> lay = ImageLayout(0, torch.arange(5, 9), segs, torch.zeros(4, dtype=torch.bool), kind="video", frames=2)
            >>> [v.positions.tolist() for v in ImageView(lay, embeds=torch.zeros(10, 1)).frame_views()]
            [[5, 6], [7, 8]]
        """
        if self.frames == 1:
            return [self]
        lay, ppt = self.layout, self.patches_per_token
        bounds = [s.offset for s in lay.segments] + [lay.num_tokens]
        views = []
        for a, b, seg in zip(bounds[:-1], bounds[1:], lay.segments):
            # towers with video (Qwen) hold one captured row per patch, in token order
            vision = {
                layer: {k: t[a * ppt : b * ppt] for k, t in got.items()} for layer, got in lay.vision.items()
            }
            frame = ImageLayout(
                lay.row,
                lay.positions[a:b],
                [replace(seg, offset=seg.offset - a)],
                lay.newline[a:b],
                extra=lay.extra,
                source=None if lay.source is None else lay.source[a:b],
                vision=vision,
                kind=lay.kind,
                frames=1,
            )
            views.append(replace(self, layout=frame, _cache={}))
        return views

    @property
    def source(self) -> torch.Tensor | None:
        return self.layout.source

    @property
    def device(self) -> torch.device:
        return self.embeds.device if self.embeds is not None else self.layout.positions.device

    def _memo(self, key, build):
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    @property
    def positions(self) -> torch.Tensor:
        """Sequence positions of the image's tokens in its row (on the embeddings' device)."""
        return self._memo("positions", lambda: self.layout.positions.to(self.device))

    @property
    def newline(self) -> torch.Tensor:
        """``[n]`` bool: LLaVA-NeXT row-newline tokens (learned vectors, not patches)."""
        return self._memo("newline", lambda: self.layout.newline.to(self.device))

    @property
    def num_newlines(self) -> int:
        return int(self.layout.newline.sum())  # the layout lives on the host: no device sync

    @property
    def newline_indices(self) -> torch.Tensor:
        return self._memo("newline_idx", lambda: torch.nonzero(self.layout.newline).flatten().to(self.device))

    @property
    def patch_indices(self) -> torch.Tensor:
        """Local indices of the image's patch tokens (everything but newlines), in order."""
        return self._memo("patch_idx", lambda: torch.nonzero(~self.layout.newline).flatten().to(self.device))

    @property
    def crop_index(self) -> torch.Tensor:
        """``[n]``: the tower crop each token came from (0: LLaVA-NeXT's base image), -1 for newlines."""

        def build():
            src = self.layout.source
            if src is None or self.tower_tokens_per_crop is None:
                return torch.where(self.layout.newline, -1, 0).to(self.device)
            return torch.where(src >= 0, src // self.tower_tokens_per_crop, -1).to(self.device)

        return self._memo("crop_index", build)

    def partitions(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per tower crop with tokens here: ``(patches, cls)`` local indices, where ``cls`` holds the
        placeholder of the crop's CLS token (LLaVA's "full" feature strategy) or is empty."""
        tokens = torch.nonzero(~self.layout.newline).flatten()
        src = self.layout.source
        if src is None or self.tower_tokens_per_crop is None:
            return [(tokens.to(self.device), tokens[:0].to(self.device))]
        s = src[tokens]
        crop = s // self.tower_tokens_per_crop
        is_cls = (s % self.tower_tokens_per_crop == 0) & self.has_cls  # a tower without CLS has none
        return [
            (tokens[(crop == j) & ~is_cls].to(self.device), tokens[(crop == j) & is_cls].to(self.device))
            for j in range(self.crops)
            if bool((crop == j).any())  # host tensors: no device sync
        ]

    # -- tower-side tensors ---------------------------------------------------------------
    def default_block(self, layer: int) -> int:
        """The tower layer whose scores stand for a method's default ``layer``."""
        return layer if self.score_block is None else self.score_block(layer)

    @property
    def score_layer(self) -> int:
        """The tower layer feature-layer methods (HiRED, VisionZip) read scores from by default."""
        return self.default_block(self.feature_layer)

    def captured(self, layer: int) -> dict:
        got = self.layout.vision.get(layer)
        if got is None:
            raise RuntimeError(f"vtprune: no vision-tower scores captured at layer {layer} for this image")
        return got

    def cls_scores(self, layer: int, score: str = "attention") -> torch.Tensor:
        """``[n]`` float: each token's tower score at ``layer``, ``-inf`` for newline tokens.

        CLS towers: the CLS attention (summed over heads) of the tower token it came from. Towers
        without CLS (Qwen2-VL): the documented substitute, the attention each patch receives from
        all patches of its image, averaged over the patches merged into the token; with
        ``score="wpr"`` the weighted PageRank of the image's head-mean map instead (captured only
        for stages whose ``tower_score`` is ``"wpr"``), averaged the same way.
        """
        got = self.captured(layer)
        name = "wpr" if score == "wpr" else "received"
        if score == "wpr" and "wpr" not in got:
            raise RuntimeError(f"vtprune: no weighted-PageRank tower score captured at layer {layer}")
        if self.layout.taps is not None:
            return self._tapped(got[name], float("-inf"))
        if not self.has_cls or "received" in got:
            return got[name].view(self.num_tokens, self.patches_per_token).mean(1)
        flat = got["cls"].flatten()
        src = self.layout.source.to(flat.device)
        return torch.where(src >= 0, flat[src.clamp(min=0)], torch.tensor(float("-inf"), device=flat.device))

    def hub_scores(self, layer: int) -> torch.Tensor:
        """``[n]`` float: the attention each token gets from its crop's (image's) hub tokens at
        ``layer`` (``vtprune.scoring.hub_attention``; Qwen2-VL: averaged over the patches merged
        into the token), ``-inf`` for newline tokens. Captured only for stages that ask for it
        (``VisionStage.vision_hub``)."""
        got = self.captured(layer)
        if "hub" not in got:
            raise RuntimeError(
                f"vtprune: no hub-token attention captured at tower layer {layer} for this image"
            )
        if self.layout.taps is not None:
            return self._tapped(got["hub"], float("-inf"))
        if not self.has_cls:
            return got["hub"].view(self.num_tokens, self.patches_per_token).mean(1)
        flat = got["hub"].flatten()
        src = self.layout.source.to(flat.device)
        return torch.where(src >= 0, flat[src.clamp(min=0)], torch.tensor(float("-inf"), device=flat.device))

    def keys(self, layer: int) -> torch.Tensor:
        """``[n, head_dim]``: each token's tower key at ``layer`` (mean over heads)."""
        keys = self.captured(layer)["keys"]
        if self.layout.taps is not None:
            return self._tapped(keys, 0.0)
        if not self.has_cls or self.layout.source is None:
            return keys.reshape(self.num_tokens, -1, keys.shape[-1]).mean(1)
        flat = keys.reshape(-1, keys.shape[-1])
        return flat[self.layout.source.clamp(min=0).to(flat.device)]

    def tower_features(self, layer: int) -> torch.Tensor:
        """``[n, D_tower]``: each token's tower hidden state at the output of ``layer``."""
        hidden = self.captured(layer)["hidden"]
        if self.layout.taps is not None:
            return self._tapped(hidden, 0.0)
        if not self.has_cls or self.layout.source is None or hidden.dim() == 2:
            return hidden.reshape(self.num_tokens, -1, hidden.shape[-1]).mean(1)
        flat = hidden.reshape(-1, hidden.shape[-1])
        return flat[self.layout.source.clamp(min=0).to(flat.device)]

    def _tapped(self, tower: torch.Tensor, newline_value: float) -> torch.Tensor:
        """Per token, the tap-weighted sum of per-tower-token values (``[crops, T, ...]``); newline
        tokens get ``newline_value``."""
        index, weight = self.layout.taps
        flat = tower.flatten(0, 1).float()
        index, weight = index.to(flat.device), weight.to(flat.device)
        w = weight.view(*weight.shape, *([1] * (flat.dim() - 1)))
        out = (flat[index] * w).sum(1)
        fill = self.newline.to(flat.device).view(-1, *([1] * (flat.dim() - 1)))
        return torch.where(fill, torch.tensor(newline_value, device=flat.device), out)

    def tower_hidden(self, layer: int) -> torch.Tensor:
        """The raw captured tower output at ``layer`` (CLS towers: ``[crops, tokens, D]``, CLS first)."""
        return self.captured(layer)["hidden"]

    # -- language-model side --------------------------------------------------------------
    @property
    def features(self) -> torch.Tensor:
        """``[n, D]``: the image's language-model input embeddings (the projector's outputs)."""
        return self.embeds[self.positions]

    @property
    def instruction_positions(self) -> torch.Tensor:
        if self.instruction is None:
            raise RuntimeError("vtprune: this view carries no instruction tokens")
        return torch.nonzero(self.instruction).flatten()

    @property
    def instruction_ids(self) -> torch.Tensor:
        return self.input_ids[self.instruction]

    @property
    def instruction_embeds(self) -> torch.Tensor:
        """``[m, D]``: input embeddings of the prompt's instruction tokens."""
        return self.embeds[self.instruction]


def instruction_mask(visual: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``[B, L]`` bool: per row, the real text tokens after its last visual token (all its text
    tokens where an image ends the prompt or the row has none), computed without host syncs.

    Example:
        >>> vis = torch.tensor([[False, True, True, False, False], [True, False, False, False, False]])
        >>> instruction_mask(vis, torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]).bool()).int().tolist()
        [[0, 0, 0, 1, 1], [0, 1, 1, 0, 0]]
    """
    idx = torch.arange(visual.shape[1], device=visual.device)
    last = torch.where(visual, idx, -1).max(1).values.unsqueeze(1)
    text = valid & ~visual
    after = text & (idx > last)
    return torch.where(after.any(1, keepdim=True), after, text)
