"""Tower stages on Qwen3-VL's vision tower: Qwen2-VL's whole-merge-group drops, plus DeepStack.

Qwen3-VL's blocks attend per image (frame) in token order, as Qwen2-VL's, so
:class:`~vtprune.runtime.tower_qwen.QwenTowerRun` prunes them unchanged. The tower also sends the
output of the blocks in ``deepstack_visual_indexes`` through their own mergers, and the text model
adds those features at the visual positions after its first layers. A block's DeepStack merger
sees the patches present at that block (a drop right after it comes later, at the next block):
a forward hook puts its merged rows back at their original token slots (zeros at the groups
already gone), so every DeepStack tensor has one row per language-model token, as the final
features do. The tokens the tower dropped then leave at the language model's input, and the
runtime's DeepStack re-indexing (``vtprune.runtime.injection``) hands each decoder layer the rows
of the tokens it holds: a kept token's DeepStack features are its own, taken at each DeepStack
block from the survivors of that block.
"""

from __future__ import annotations

from .tower_qwen import QwenTowerRun


class Qwen3TowerRun(QwenTowerRun):
    def install(self, handles: list) -> None:
        super().install(handles)
        for merger in self.adapter.vision_tower.deepstack_merger_list:
            handles.append(merger.register_forward_hook(self._deepstack_to_slots))

    def _deepstack_to_slots(self, module, args, output):
        call = self._mine()
        if call is None or call.index is None:
            return None
        units = call.index[:: self.group] // self.group
        total = sum(call.orig_lens) // self.group
        if units.numel() == total:
            return None  # nothing gone yet: the rows are already in token order
        full = output.new_zeros(total, output.shape[-1])
        full[units] = output
        return full
