"""Tower stages on LLaVA-OneVision: SigLIP crops (no CLS) as rows, anyres downscaling and video pooling.

The rows are the tower batch as HF runs it: the base image and tiles of an image, the frames of
a video. Budgets per image, candidates and the crop grid are LLaVA-NeXT's
(:mod:`vtprune.runtime.tower_next`); what differs:

* **no CLS.** The scoring row is the mean query of the row's present patches against their keys
  (``TowerCall.cls_row``), every slot is a patch and none is forced to stay.
* **no CLS offset on the grid.** The "full" strategy projects every tower token, so the projector
  hook scatters the projected survivors to their own cells of the ``side x side`` crop (zeros
  elsewhere); packing, unpadding, ``anyres_max`` downscaling, video pooling and newlines run
  unchanged in HF's code.
* **resampled tokens.** Downscaling and video pooling make a language-model token the bilinear mix
  of up to four tower tokens (``ImageSpec.taps``). Such a token is kept iff its heaviest tap (the
  ``source`` the adapter names, one tower token per language-model token) survives, so the kept
  count is the survivors' count; its feature is the mix over its *surviving* taps with their
  weights renormalised to sum to 1 (HF mixed zeros in for the dropped taps; :meth:`finish`
  divides by the surviving weight), so a dropped patch neither leaks in nor shrinks the feature.
  Taps that are nobody's heaviest are not candidates (``TowerContext.candidates``): they leave
  with their crop's first drop, so a pooled video token of a pruned clip is mostly its heaviest
  patch. A vision stage composed with the tower stage reads a mixed token's tower scores and keys
  with the same renormalised weights (``vision["tower_taps"]``).
"""

from __future__ import annotations

import torch

from .tower import TOWER
from .tower_next import NextTowerCall, NextTowerRun


class OneVisionTowerCall(NextTowerCall):
    def finish(self, feats: list[torch.Tensor], specs: list):
        """The packed features with every mixed token renormalised over its surviving taps, and
        what each image (or video) kept; a call of videos gives its stacked tensor back."""
        per_crop = self.run.per_crop
        kept = torch.zeros(self.index.shape[0], per_crop, dtype=torch.bool, device=self.index.device)
        kept.scatter_(1, self.index, self.valid)
        kept = kept.cpu()
        feats, vision = super().finish(feats, specs)
        out, r0 = [], 0
        for f, spec, v in zip(feats, specs, vision):
            idx, w = spec.taps
            alive = kept[r0 + idx // per_crop, idx % per_crop] & (w > 0)
            dropped = (w > 0) & ~alive
            mixed = dropped.any(1) & alive.any(1)  # a token mixing a dropped tap and a survivor
            if bool(mixed.any()):
                total = (w * alive).sum(1)[mixed]
                f = f.clone()
                f[mixed.to(f.device)] = f[mixed.to(f.device)] / total[:, None].to(f.device, f.dtype)
                # a composed vision stage mixes the tower's scores and keys as the feature was mixed
                w = w.clone()
                w[mixed] = w[mixed] * alive[mixed] / total[:, None]
                v["tower_taps"] = (idx, w)
            out.append(f)
            r0 += spec.crops
        if specs and all(spec.kind == "video" for spec in specs):
            return torch.stack(out), vision  # HF flattens the videos' stacked tensor
        return out, vision


class OneVisionTowerRun(NextTowerRun):
    """:class:`NextTowerRun` for SigLIP crops without CLS whose tokens may be resampled."""

    def new_call(self) -> OneVisionTowerCall:
        return OneVisionTowerCall(self)

    def _to_grid(self, module, args, output):
        """Projected survivors ``[rows, kept, D]`` back to every crop's full grid (zeros elsewhere)."""
        call = TOWER.get()
        if call is None or call.run is not self or call.index is None:
            return None
        rows = output.shape[0]
        grid = output.new_zeros(rows, self.per_crop, output.shape[-1])
        row = torch.arange(rows, device=call.index.device).unsqueeze(1).expand_as(call.index)
        grid[row[call.valid], call.index[call.valid]] = output[call.valid]
        return grid
