"""Tower stages on LLaVA-NeXT: each anyres crop (the base image and the grid crops) is one row of
the CLIP tower batch.

The rows are pruned as on LLaVA-1.5 (:mod:`vtprune.runtime.tower`), with two things only an
image of several crops has:

* **budgets per image.** Before the first pruning layer the runner reads the call's image specs
  (``ImageSpec.source`` maps each language-model token to its crop and tower token), asks the
  stage how many patches the image keeps (:meth:`crop_budget`) and splits that over the image's
  crops in proportion to the patches each crop shows the language model (cumulative rounding, so
  the shares add up exactly). Patches that LLaVA-NeXT's unpadding cuts away never reach the
  language model: they are not candidates (``TowerContext.candidates``) and the stage may drop
  them freely.
* **the crop grid.** HF's ``pack_image_features`` reshapes every crop to its full grid, unpads it
  and appends a newline per row. A forward hook on the projector therefore scatters the projected
  survivors back to their grid cells (zeros elsewhere; the projector itself runs on the survivors
  only), so packing, unpadding and newlines run unchanged; the survivors' placeholders are then
  found through ``source`` exactly as the unpadded layout places them. A newline has no tower
  token: it is kept when its image dropped no patch (so a stage with nothing to drop is the
  unpruned model) and dropped otherwise (FlowCut's official code drops the newlines of pruned
  images).
"""

from __future__ import annotations

import torch

from .tower import TOWER, TowerCall, TowerRun


class NextTowerCall(TowerCall):
    def __init__(self, run: NextTowerRun):
        super().__init__(run)
        self.specs: list | None = None  # the call's image specs (set by the encoder tap)
        self.targets: torch.Tensor | None = None  # [rows] patches each crop keeps
        self.shows: torch.Tensor | None = None  # [rows, tower tokens] reaches the language model

    def plan(self, stage, device) -> None:
        """Per crop: the patches it keeps and which of its tower tokens the language model shows."""
        per_crop = self.run.per_crop
        rows = sum(spec.crops for spec in self.specs)
        if rows != self.index.shape[0]:
            raise RuntimeError(
                f"vtprune: the tower ran {self.index.shape[0]} crops but the image sizes describe {rows}"
            )
        shows = torch.zeros(rows, per_crop, dtype=torch.bool)
        targets, r0 = [], 0
        for spec in self.specs:
            src = spec.source[spec.source >= 0]
            shows[r0 + src // per_crop, src % per_crop] = True
            visible = shows[r0 : r0 + spec.crops].sum(1)
            total = int(visible.sum())
            budget = stage.crop_budget(spec.num_tokens, total)
            ends = [(2 * budget * int(c) + total) // (2 * total) for c in visible.cumsum(0)]
            targets += [b - a for a, b in zip([0] + ends[:-1], ends)]
            r0 += spec.crops
        self.targets = torch.tensor(targets, device=device)
        self.shows = shows.to(device)

    def finish(self, feats: list[torch.Tensor], specs: list) -> tuple[list[torch.Tensor], list[dict]]:
        """Features stay as packed (the projector hook already placed them); what each image kept."""
        per_crop = self.run.per_crop
        kept = torch.zeros(self.index.shape[0], per_crop, dtype=torch.bool, device=self.index.device)
        kept.scatter_(1, self.index, self.valid)
        kept = kept.cpu()
        counts = torch.stack(self.counts, 1).cpu()  # [rows, tower layers]
        vision, r0 = [], 0
        for spec in specs:
            src = spec.source
            newline = src < 0
            at = src.clamp(min=0)
            patch = kept[r0 + at // per_crop, at % per_crop] & ~newline
            whole = bool(patch[~newline].all())
            local = torch.nonzero(patch | (newline & whole)).flatten()
            vision.append({"tower_kept": local, "tower_tokens": counts[r0 : r0 + spec.crops].sum(0).tolist()})
            r0 += spec.crops
        return feats, vision


class NextTowerRun(TowerRun):
    """:class:`TowerRun` with per-image budgets and the crop grid restored after the projector."""

    needs_specs = True  # the encoder tap hands each call its image specs before the tower runs

    def __init__(self, adapter, stages: list):
        super().__init__(adapter, stages)
        self.per_crop = adapter.tower_tokens_per_crop

    def new_call(self) -> NextTowerCall:
        return NextTowerCall(self)

    def install(self, handles: list) -> None:
        super().install(handles)
        projector = self.adapter.mm_model.multi_modal_projector
        handles.append(projector.register_forward_hook(self._to_grid))

    def context_extras(self, call: NextTowerCall) -> dict:
        if call.targets is None:
            call.plan(self.stages[0], call.index.device)
        return {"row_target": call.targets, "candidates": call.shows.gather(1, call.index)}

    def _to_grid(self, module, args, output):
        """Projected survivors ``[crops, kept, D]`` back to every crop's full grid (zeros elsewhere)."""
        call = TOWER.get()
        if call is None or call.run is not self or call.index is None:
            return None
        rows = output.shape[0]
        index, valid = call.index[:, 1:] - 1, call.valid[:, 1:]  # the "default" strategy drops CLS
        grid = output.new_zeros(rows, self.per_crop - 1, output.shape[-1])
        row = torch.arange(rows, device=index.device).unsqueeze(1).expand_as(index)
        grid[row[valid], index[valid]] = output[valid]
        return grid
