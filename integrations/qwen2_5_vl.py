"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``): Qwen2-VL's layout with a window-attention tower.

The LM side (placeholders, 3-D M-RoPE, ``rope_deltas``, ``mm_token_type_ids``) is Qwen2-VL's.
The tower differs: most blocks attend within windows of merge units and only the blocks in
``fullatt_block_indexes`` attend over the whole image, and every block runs on a
*window-permuted* order of the patches (``get_vision_window_index``), mapped back only after the
patch merger. So vision-side scores:

* come by default from a full-attention block (a window block's attention stays inside its
  window): the last full-attention block at or before the block a method would read;
* are mapped from the window order back to the token order (as are captured hidden states and
  keys) before any method reads them, then pooled over the 2x2 patches of each merge unit.

An explicitly chosen window block is scored within its windows (the mean attention a patch
receives from the queries of its window).
"""

from __future__ import annotations

import sys

import torch

from .qwen2_vl import Qwen2VLAdapter


class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    family = "qwen2_5_vl"
    supported_classes = ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLModel")

    @property
    def full_attention_blocks(self) -> list[int]:
        n = self.vision_layers_count
        return sorted(
            {int(b) % n for b in self.config.vision_config.fullatt_block_indexes if -n <= int(b) < n}
        )

    def check_tower_stage(self, method: str) -> None:
        """Tower stages run on the window-permuted blocks (``vtprune.runtime.tower_qwen25``)."""

    def score_block(self, layer: int) -> int:
        layer = layer % self.vision_layers_count
        full = self.full_attention_blocks
        before = [b for b in full if b <= layer]
        if before:
            return before[-1]
        return full[0] if full else layer

    def vision_patch_order(self, grid_thw, kwargs: dict) -> torch.Tensor | None:
        """Patch order inside the tower's blocks: the window index of its merge units, expanded."""
        tower = self.vision_tower
        index = kwargs.get("window_index")
        if index is None or kwargs.get("cu_window_seqlens") is None:
            # the function the tower itself calls (looked up where it does, so both always agree)
            window_index = sys.modules[type(tower).__module__].get_vision_window_index
            vc = self.config.vision_config
            index, _ = window_index(
                torch.as_tensor(grid_thw),
                spatial_merge_size=vc.spatial_merge_size,
                window_size=vc.window_size,
                patch_size=vc.patch_size,
            )
        unit = self.patches_per_token
        index = torch.as_tensor(index).long().view(-1, 1) * unit
        return (index + torch.arange(unit, device=index.device)).flatten()
