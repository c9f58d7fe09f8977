"""Qwen3-VL (``Qwen3VLForConditionalGeneration``): Qwen2-VL's token layout plus DeepStack.

What stays as on Qwen2-VL: image/video placeholders (``image_token_id`` / ``video_token_id``)
checked against ``mm_token_type_ids``, 2x2 merge units, 3-D position *values* from the unpruned
prompt (Qwen3-VL only interleaves the T/H/W frequencies, which the model does from the values the
runtime gathers), per-row ``rope_deltas`` at decode, a tower without CLS (vision-stage scores: the
received-attention substitute of ``vtprune.runtime.vision``, pooled on the 2x2 merge units) and
blocks that attend per frame in token order (no window permutation).

Videos: the processor writes every temporal patch as ``<t seconds>`` text + vision start +
``video_pad`` x frame tokens + vision end. The timestamps are text tokens, so no method drops
them; one video is still one medium whose frames are its grid segments, their placeholders
separated by that text.

DeepStack: the tower also returns features of ``deepstack_visual_indexes`` (three layers on the
released models), each through its own merger, and the text model adds feature ``i`` to the
hidden states at the visual positions after decoder layer ``i``
(``Qwen3VLTextModel._deepstack_process``). vtprune shadows that method on the instance
(:attr:`injection_method`): the runtime hands it only the rows of the visual tokens that the
layer really holds, so vision-stage pruning drops a token's DeepStack features with the same
indices as its embedding, and a prefill stage before the last injection layer (FastV at K=2,
PyramidDrop's first stage on a shallow model) has the later injections re-indexed onto the kept
tokens. A token merged by VisionZip or MustDrop keeps its own DeepStack features (the merge is
formed on the merger's outputs only).
"""

from __future__ import annotations

from .qwen2_vl import Qwen2VLAdapter


class Qwen3VLAdapter(Qwen2VLAdapter):
    family = "qwen3_vl"
    supported_classes = ("Qwen3VLForConditionalGeneration", "Qwen3VLModel")
    #: the text model adds per-visual-token features after its first layers: the runtime
    #: re-indexes them onto the tokens each layer holds (``vtprune.runtime.injection``)
    injection_method = "_deepstack_process"

    def check_tower_stage(self, method: str) -> None:
        """Tower stages run; DeepStack features follow the survivors (``vtprune.runtime.tower_qwen3``)."""

    @property
    def injection_layers(self) -> list[int]:
        """Decoder layers after which DeepStack features are added (one per tower feature layer)."""
        return list(range(len(self.config.vision_config.deepstack_visual_indexes)))
