"""Which tower-stage runner serves a model family (each tower lays its tokens out differently)."""

from __future__ import annotations

from .tower import TowerRun
from .tower_next import NextTowerRun
from .tower_onevision import OneVisionTowerRun
from .tower_qwen import QwenTowerRun
from .tower_qwen3 import Qwen3TowerRun
from .tower_qwen25 import Qwen25TowerRun


def tower_run_class(adapter) -> type:
    """The runner class for ``adapter``'s tower: CLIP crops (LLaVA-NeXT: anyres crops of images;
    LLaVA-OneVision: SigLIP crops and video frames without CLS),
    CLIP images (LLaVA-1.5), flat patch sequences without CLS (Qwen2-VL), the same in window
    order (Qwen2.5-VL) or with DeepStack features (Qwen3-VL)."""
    if adapter.family == "llava_next":
        return NextTowerRun
    if adapter.family == "llava_onevision":
        return OneVisionTowerRun
    if adapter.family == "qwen2_5_vl":
        return Qwen25TowerRun
    if adapter.family == "qwen3_vl":
        return Qwen3TowerRun
    return TowerRun if adapter.has_cls else QwenTowerRun
