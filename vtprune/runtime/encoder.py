"""Reading image structure (and tower scores) while images are encoded.

``generate`` encodes images before prefill and pops ``pixel_values`` / ``image_sizes`` /
``image_grid_thw``; the forward then only sees ``mm_encoder_outputs``. The encoder method is
shadowed on the model instance by :meth:`EncoderTap.wrap`, which records each image's token
structure (and, with a probe, its vision-side scores) on the encoder output.
"""

from __future__ import annotations

import contextvars
import inspect

import torch

from vtprune.images import GridSegment, ImageSpec

from .plumbing import bind_call
from .state import ACTIVE
from .tower import TOWER
from .vision import CAPTURE, split_per_image

_ENCODING: contextvars.ContextVar[bool] = contextvars.ContextVar("vtprune_encoding", default=False)


class EncoderTap:
    def __init__(self, adapter, probe, is_mine, tower=None):
        self.adapter, self.probe, self.is_mine, self.tower = adapter, probe, is_mine, tower

    def wrap(self, method):
        """Record each encoded image's token structure on the encoder output.

        ``generate`` encodes images before prefill and pops ``pixel_values`` / ``image_sizes`` /
        ``image_grid_thw``; the forward then only sees ``mm_encoder_outputs``. The structure is
        keyed by the identity of each image's feature tensor, which survives generate's
        per-beam repetition of the feature list.
        """
        signature = inspect.signature(method)

        def encode(*args, **kwargs):
            if _ENCODING.get():
                # an encoder method calling another (Qwen3-VL's video features are its image
                # features of the frames): the outer call records, under its own media kind
                return method(*args, **kwargs)
            outer = _ENCODING.set(True)
            token = CAPTURE.set({}) if self.probe is not None else None
            call = self.tower.new_call() if self.tower is not None else None
            if call is not None and getattr(self.tower, "needs_specs", False):
                # rows of the tower batch are parts of images (crops): the runner sizes them per image
                call.specs = self.adapter.image_specs(bind_call(signature, args, kwargs))
            tower_token = TOWER.set(call) if call is not None else None
            try:
                out = method(*args, **kwargs)
            finally:
                raw = CAPTURE.get() if token is not None else None
                if token is not None:
                    CAPTURE.reset(token)
                if tower_token is not None:
                    TOWER.reset(tower_token)
                _ENCODING.reset(outer)
            feats = getattr(out, "pooler_output", None)
            stacked = isinstance(feats, torch.Tensor) and feats.dim() == 3  # LLaVA-OneVision videos
            if isinstance(feats, (list, tuple)) or stacked:
                specs = self.adapter.image_specs(bind_call(signature, args, kwargs))
                if len(specs) == len(feats):
                    vision = [{} for _ in specs]
                    if raw:
                        finished = self.probe.finish(raw)
                        if call is not None and call.index is not None:
                            finished = call.expand(finished)  # the tower's survivors at their own slots
                        vision = split_per_image(finished, specs, self.adapter)
                    if call is not None and call.index is not None:
                        feats, kept = call.finish(list(feats), specs)
                        out.pooler_output = feats
                        for v, k in zip(vision, kept):
                            v.update(k)
                    if stacked:  # rows of one tensor have no identity of their own: keep the order
                        out._vtprune_rows = (specs, vision)
                    else:
                        out._vtprune_specs = {id(f): spec for f, spec in zip(feats, specs)}
                        if any(vision):
                            out._vtprune_vision = {id(f): v for f, v in zip(feats, vision)}
                    if any(vision):
                        self._attach_vision_to_active(vision, {spec.kind for spec in specs})
            return out

        encode.__wrapped__ = method
        return encode

    def _attach_vision_to_active(self, vision: list[dict], kinds: set[str]) -> None:
        """Direct forward path: the tower runs inside the forward, after the request started, once
        for the images and once for the videos; each run's scores go to the media of its kind,
        in the order HF scatters them (row-major over the kind's placeholders)."""
        state = ACTIVE.get()
        if not self.is_mine(state) or not getattr(state, "prefilling", False):
            return
        images = [img for row in state.layouts for img in row if img.kind in kinds]
        if len(images) == len(vision):
            for img, v in zip(images, vision):
                img.vision = v

    def specs_for_call(self, call: dict) -> tuple[list, list[dict]]:
        """Token structure (and captured tower scores) of every image, then every video, of a call
        (``Adapter.layouts`` places each kind in its own placeholders)."""
        encoded = call.get("mm_encoder_outputs") or {}
        specs, vision = [], []
        for modality in ("image", "video"):
            out = encoded.get(modality)
            if out is None:
                continue
            rows = getattr(out, "_vtprune_rows", None)
            if rows is not None:
                n = len(out.pooler_output)
                if len(rows[0]) == n:
                    specs += rows[0]
                    vision += rows[1]
                else:  # expanded by generate (beams): one tensor's rows share one structure; no scores
                    specs += [rows[0][0]] * n
                    vision += [{} for _ in range(n)]
                continue
            table = getattr(out, "_vtprune_specs", {})
            captured = getattr(out, "_vtprune_vision", {})
            for feat in out.pooler_output:
                spec = table.get(id(feat))
                if spec is None:
                    n = len(feat)
                    spec = ImageSpec(
                        n,
                        (GridSegment(offset=0, rows=1, cols=n, row_stride=n, name="unknown"),),
                        kind=modality,
                    )
                specs.append(spec)
                vision.append(captured.get(id(feat), {}))
        if specs:
            return specs, vision
        specs = self.adapter.image_specs(call)
        return specs, [{} for _ in specs]
