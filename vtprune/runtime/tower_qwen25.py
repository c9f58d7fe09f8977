"""Tower stages on Qwen2.5-VL's vision tower: Qwen2-VL's whole-merge-group drops, in window order.

Qwen2.5-VL runs its blocks on a *window-permuted* patch list: the merge units (2x2 patches, still
four consecutive slots) are reordered window by window (``get_vision_window_index``), the blocks
in ``fullatt_block_indexes`` attend within each image (frame) through ``cu_seqlens`` and the
others within each window through the windows' own boundaries, and the merged tokens are put
back in token order only after the merger. Windows lie inside their image, so both boundary
lists cut the same permuted list.

On top of :class:`~vtprune.runtime.tower_qwen.QwenTowerRun` (gather hidden states and rotary
tables, rebuild the images' ``cu_seqlens``) this runner:

* remembers each patch's window and, after a drop, rebuilds the window boundaries from the
  survivors (a window left empty disappears), handing every block the list of its own kind
  (and the matching ``max_seqlen``);
* after the merger puts the survivors' merged tokens back at their window-order slots (zeros
  elsewhere), so the tower's own reordering to token order runs unchanged, and records the kept
  tokens in token order.

The stage's row is scored over the whole image at every block, window blocks included (the row
is computed beside the block from its own q/k, not read from the windowed attention).
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from .tower_qwen import QwenTowerCall, QwenTowerRun


class Qwen25TowerCall(QwenTowerCall):
    def __init__(self, run: Qwen25TowerRun):
        super().__init__(run)
        self.order: torch.Tensor | None = None  # [units] token-order unit at each window-order unit
        self.window_of: torch.Tensor | None = None  # [patches] window of each window-order patch
        self.window_cu: torch.Tensor | None = None  # window boundaries of the present patches
        self.image_cu: torch.Tensor | None = None  # image (frame) boundaries at the tower's input

    def expand(self, finished: dict) -> dict:
        """A probe's captures of blocks after a drop back at the original patches, in token order.

        The probe puts whole-length captures (blocks before any drop) in token order itself; the
        shorter ones hold the present patches in window order: they go to their window-order slots
        (``slots`` count in the permuted list the blocks run on), then the window order is undone
        as for a whole tower.
        """
        total = self.slots[0].numel()
        late = {layer for layer in finished if self.slots[layer].numel() != total}
        finished = super().expand(finished)
        group = self.run.group
        order = (self.order.view(-1, 1) * group + torch.arange(group, device=self.order.device)).flatten()
        inverse = torch.argsort(order)  # blocks[i] = patches[order[i]]
        for layer in late:
            tensors = finished[layer]
            for name, t in tensors.items():
                if t.shape[0] == total:
                    tensors[name] = t[inverse.to(t.device)]
        return finished


class Qwen25TowerRun(QwenTowerRun):
    def __init__(self, adapter, stages: list):
        super().__init__(adapter, stages)
        self.full_blocks = set(adapter.full_attention_blocks)

    def new_call(self) -> Qwen25TowerCall:
        return Qwen25TowerCall(self)

    def install(self, handles: list) -> None:
        visual = self.adapter.vision_tower
        handles.append(visual.register_forward_pre_hook(self._windows, with_kwargs=True))
        super().install(handles)
        handles.append(visual.merger.register_forward_hook(self._to_window_slots))

    def _windows(self, module, args, kwargs):
        """Before the tower: the window order and window boundaries its blocks will use."""
        call = self._mine()
        if call is None:
            return None
        grid = args[1] if len(args) > 1 else kwargs["grid_thw"]
        vc = self.adapter.config.vision_config
        window_index = sys.modules[type(module).__module__].get_vision_window_index
        # a copy: precomputed window_index / cu_window_seqlens stay in the caller's kwargs
        order, cu = window_index(
            torch.as_tensor(grid),
            spatial_merge_size=vc.spatial_merge_size,
            window_size=vc.window_size,
            patch_size=vc.patch_size,
            kwargs=dict(kwargs),
        )
        cu = torch.as_tensor(cu).long()
        call.order = torch.as_tensor(order).long()
        call.window_of = torch.repeat_interleave(torch.arange(cu.numel() - 1, device=cu.device), cu.diff())
        call.window_cu = cu
        # per image (frame): its windows are consecutive in the permuted list
        grid = torch.as_tensor(grid).long()
        call.image_cu = F.pad(torch.repeat_interleave(grid[:, 1] * grid[:, 2], grid[:, 0]).cumsum(0), (1, 0))
        return None

    def _before(self, i: int):
        base = super()._before(i)

        def hook(module, args, kwargs):
            call = self._mine()
            if call is None:
                return None
            if i == 0:  # the runner starts from the images' boundaries, whatever block 0's kind
                like = kwargs["cu_seqlens"]
                kwargs = dict(kwargs, cu_seqlens=call.image_cu.to(device=like.device, dtype=like.dtype))
            out = base(module, args, kwargs)
            if i >= self.depth:
                return out
            args, kwargs = out
            if i not in self.full_blocks:
                cu = call.window_cu.to(device=call.cu.device, dtype=call.cu.dtype)
                kwargs["cu_seqlens"] = cu
                if "max_seqlen" in kwargs:
                    m = int(cu.diff().max())
                    kwargs["max_seqlen"] = torch.tensor(m) if torch.is_tensor(kwargs["max_seqlen"]) else m
            return args, kwargs

        return hook

    def _run_stage(self, call: Qwen25TowerCall, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        before = call.index.numel()
        hidden = super()._run_stage(call, layer, hidden)
        if call.index.numel() != before:
            _, counts = torch.unique_consecutive(
                call.window_of.to(call.index.device)[call.index], return_counts=True
            )
            call.window_cu = F.pad(counts.cumsum(0), (1, 0))
        return hidden

    def _to_window_slots(self, module, args, output):
        """Merged survivors back at their window-order slots (zeros elsewhere): the tower then
        reorders all its merge units to token order as usual."""
        call = self._mine()
        if call is None or call.index is None:
            return None
        units = call.index[:: self.group] // self.group
        full = output.new_zeros(call.order.numel(), output.shape[-1])
        full[units] = output
        call.kept_units = call.order.to(units.device)[units].sort().values.cpu()
        return full

    def _scatter(self, module, args, output):
        return None  # the merger hook already restored every slot
