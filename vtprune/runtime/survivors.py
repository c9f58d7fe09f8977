"""Vision stages after a tower stage: each image restricted to the tokens that left the tower.

A tower stage (FlowCut) drops tokens inside the vision tower; their placeholders then carry no
feature. A vision stage composed with it must choose among the survivors only, as it would on
a model whose tower produced only those tokens: its view of the image lists the survivors
(positions, newline flags, tower source tokens, captured tower scores and keys of the survivors'
patches), so scores, keys, similarities and the budget all refer to them. ``keep`` of the
vision stage is therefore relative to what the tower left: ``Compose(FlowCut(keep=0.5),
DivPrune(keep=0.5))`` keeps a quarter of each image.

The survivors no longer fill a 2-D grid: each grid segment of the image (LLaVA-NeXT's base image
and crops, a video's frames) becomes one row of its survivors in their original order, so
grid-aware rules (``uniform``'s lattice, MustDrop's local windows) see them in raster order.
"""

from __future__ import annotations

import torch

from vtprune.images import GridSegment, ImageLayout


def survivor_layout(img: ImageLayout, patches_per_token: int = 1) -> ImageLayout:
    """``img`` restricted to ``img.vision["tower_kept"]`` (the layout itself when the tower kept all).

    Example:
        >>> from vtprune.images import ImageLayout, GridSegment
        >>> lay = ImageLayout(0, torch.arange(10, 14), [GridSegment(0, 2, 2, 2)], torch.zeros(4, dtype=torch.bool))
        >>> lay.vision = {"tower_kept": torch.tensor([0, 3])}
        >>> sub = survivor_layout(lay)
        >>> sub.positions.tolist(), sub.num_tokens, [(s.rows, s.cols) for s in sub.segments]
        ([10, 13], 2, [(1, 2)])
    """
    kept = img.vision.get("tower_kept")
    if kept is None or (kept.numel() == img.num_tokens and "tower_taps" not in img.vision):
        return img
    kept = kept.to(img.positions.device)
    cpu = kept.cpu()
    bounds = [s.offset for s in img.segments] + [img.num_tokens]
    segments, start = [], 0
    for a, b, seg in zip(bounds[:-1], bounds[1:], img.segments):
        n = int(((cpu >= a) & (cpu < b)).sum())
        segments.append(GridSegment(offset=start, rows=1, cols=n, row_stride=n, name=seg.name))
        start += n
    vision = {}
    for layer, got in img.vision.items():
        if not isinstance(layer, int):
            continue
        vision[layer] = {
            name: _restrict(t, kept, img.num_tokens, patches_per_token) for name, t in got.items()
        }
    taps = img.vision.get("tower_taps", img.taps)  # LLaVA-OneVision: weights over surviving taps
    if taps is not None:
        taps = tuple(t[kept.to(t.device)] for t in taps)
    return ImageLayout(
        img.row,
        img.positions[kept],
        segments,
        img.newline[kept.to(img.newline.device)],
        extra=img.extra,
        source=None if img.source is None else img.source[kept.to(img.source.device)],
        crops=img.crops,
        vision=vision,
        kind=img.kind,
        frames=img.frames,
        taps=taps,
    )


def _restrict(t: torch.Tensor, kept: torch.Tensor, tokens: int, ppt: int) -> torch.Tensor:
    """Captures held per patch (towers without CLS: ``tokens * ppt`` rows) keep the survivors'
    patches; per-crop captures (CLS towers) are reached through ``source`` and stay whole."""
    if t.shape[0] != tokens * ppt:
        return t
    return t.reshape(tokens, ppt, *t.shape[1:])[kept.to(t.device)].flatten(0, 1)


def survivor_layouts(layouts: list[list[ImageLayout]], patches_per_token: int = 1) -> list[list[ImageLayout]]:
    """Every image of every row restricted to its tower survivors."""
    return [[survivor_layout(img, patches_per_token) for img in row] for row in layouts]
