"""Visual computation skipping ("Treat Visual Tokens as Text? But Your MLLM Only Needs Fewer
Efforts to See"): spend less of each layer on visual tokens, really skipping the work.

Strategies, each switchable:

* ``cut``: from layer ``L_cut`` on no query attends to visual tokens, so they are removed
  entirely there (default L_cut: half the depth; 24 of 28 layers on Qwen2-VL).
* ``thin_ffn``: during prefill, visual rows go through only the first ``1/ffn_ratio`` of the
  MLP's intermediate neurons (gate/up rows and down columns); text rows use the full MLP.
* ``window``: neighbour-window attention for visual queries (``vtprune.methods.visual_attention``).
* ``head_mask``: inactive visual heads from ``vtprune.calibrate`` (a ``HeadMask`` or its JSON path).

``keep`` sets ``L_cut`` (``round(keep * layers)``), since only the cut changes token counts.
The official code simulates both with masks; here the removed rows and neurons are not computed
(fewer FLOPs counted, less time).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vtprune.calibration import HeadMask
from vtprune.config import (
    MethodConfig,
    ModelInfo,
    check_bool,
    check_int,
    check_layer,
    check_layer_list,
    register_method,
)
from vtprune.methods.visual_attention import InactiveHeadsStage, WindowAttentionStage
from vtprune.stages import PrefillContext, PrefillStage, SkipStage

QWEN_CUT = 24 / 28


@register_method("layerskip")
@dataclass
class LayerSkip(MethodConfig):
    """Visual computation skipping.

    Args:
        cut: remove visual tokens from layer ``cut_layer`` on (default True).
        cut_layer: L_cut (default half the depth; 24/28 of the depth on Qwen2-VL).
        thin_ffn: thin MLP for visual rows during prefill (default False).
        ffn_ratio: r, visual rows use ``1/r`` of the MLP neurons (default 2).
        ffn_layers: layers using the thin MLP (default: all layers before the cut).
        window: neighbour-window size w (odd) for visual queries' attention (off by default).
        window_layers: layers using it (default: all layers before the cut).
        head_mask: a ``HeadMask`` from ``vtprune.calibrate`` or the path of its JSON file.
        renormalize: inactive heads renormalise text queries over text keys (default) or
            drop the visual probability mass as the official code does.
        keep: sets ``cut_layer = round(keep * layers)``.

    Example:
        >>> LayerSkip(keep=0.5).cut_at(ModelInfo(num_layers=32, family="llava"))
        16
    """

    cut: bool = True
    cut_layer: int | None = None
    thin_ffn: bool = False
    ffn_ratio: int = 2
    ffn_layers: list[int] | None = None
    window: int | None = None
    window_layers: list[int] | None = None
    head_mask: object = None
    renormalize: bool = True

    def validate(self) -> None:
        for flag in ("cut", "thin_ffn", "renormalize"):
            check_bool(self.name, flag, getattr(self, flag))
        if self.cut_layer is not None:
            check_int(self.name, "cut_layer", self.cut_layer)  # its range depends on the depth: at cut_at
        check_int(self.name, "ffn_ratio", self.ffn_ratio, minimum=1)
        for option in ("ffn_layers", "window_layers"):
            if getattr(self, option) is not None:
                check_layer_list(self.name, option, getattr(self, option), minimum=0)
        if self.head_mask is not None and not isinstance(self.head_mask, (HeadMask, str, os.PathLike)):
            raise ValueError(
                f"layerskip: option 'head_mask'={self.head_mask!r} is invalid; allowed: a HeadMask "
                "from vtprune.calibrate or the path of its JSON file"
            )
        if self.window is not None and (
            isinstance(self.window, bool)
            or not isinstance(self.window, int)
            or self.window < 1
            or self.window % 2 == 0
        ):
            raise ValueError(
                f"layerskip: option 'window'={self.window!r} is invalid; allowed: an odd integer >= 1"
            )
        if not (self.cut or self.thin_ffn or self.window is not None or self.head_mask is not None):
            raise ValueError("layerskip: every strategy is off; set 'cut' and/or 'thin_ffn'")
        if self.keep is not None and self.cut_layer is not None:
            raise ValueError("layerskip: give either 'keep' or 'cut_layer', not both")

    def cut_at(self, info: ModelInfo) -> int:
        n = info.num_layers
        if self.cut_layer is not None:
            layer = self.cut_layer
        elif self.keep is not None:
            layer = max(1, min(n - 1, round(self.keep * n)))
        else:
            layer = round(n * QWEN_CUT) if info.family in ("qwen2_vl", "qwen2_5_vl") else n // 2
        check_layer(self.name, "cut_layer", layer, n)
        return layer

    def stages(self, info: ModelInfo) -> list:
        do_cut = self.cut and not (self.keep is not None and self.keep >= 1.0)  # keep=1: nothing removed
        cut = self.cut_at(info) if do_cut else info.num_layers
        stages: list = [CutStage(cut)] if do_cut else []
        if self.thin_ffn:
            layers = self.ffn_layers if self.ffn_layers is not None else list(range(cut))
            stages.append(ThinFFNStage(set(_check_layers("ffn_layers", layers, info)), self.ffn_ratio))
        if self.window is not None:
            layers = self.window_layers if self.window_layers is not None else list(range(cut))
            stages.append(
                WindowAttentionStage(set(_check_layers("window_layers", layers, info)), self.window)
            )
        if self.head_mask is not None:
            mask = (
                HeadMask.load(self.head_mask) if not isinstance(self.head_mask, HeadMask) else self.head_mask
            )
            per_layer = mask.for_model(info.num_layers)
            if self.window is not None and set(per_layer) & stages[-1].attention_layers:
                raise ValueError(
                    "layerskip: 'window' and 'head_mask' act on the same layers; give them disjoint 'window_layers'"
                )
            stages.append(InactiveHeadsStage(per_layer, self.renormalize))
        return stages


def _check_layers(option: str, layers, info: ModelInfo) -> list[int]:
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < info.num_layers:
            raise ValueError(
                f"layerskip: option {option!r} holds {layer!r}; allowed: integers in 0..{info.num_layers - 1}"
            )
    return list(layers)


class CutStage(PrefillStage):
    """Drops every visual token before ``layer``."""

    def __init__(self, layer: int):
        self.layer, self.key = layer, f"layerskip-cut@{layer}"

    def expected_count(self, n_in: int, n_current: int) -> int:
        return 0

    def select(self, ctx: PrefillContext) -> torch.Tensor:
        return torch.zeros_like(ctx.visual)


class ThinFFNStage(SkipStage):
    """Visual rows through the first ``1/ratio`` of the MLP neurons (prefill)."""

    key = "layerskip-thin-ffn"

    def __init__(self, layers: set[int], ratio: int):
        self.layers, self.ratio = layers, ratio

    def mlp(self, mlp, x: torch.Tensor, visual: torch.Tensor, full) -> torch.Tensor:
        if not bool(visual.any()):
            return full(x)
        m = mlp.gate_proj.out_features // self.ratio
        out = torch.empty_like(x)
        text = ~visual
        if bool(text.any()):
            out[text] = full(x[text])
        xv = x[visual]
        gate = F.linear(xv, mlp.gate_proj.weight[:m], _rows(mlp.gate_proj.bias, m))
        up = F.linear(xv, mlp.up_proj.weight[:m], _rows(mlp.up_proj.bias, m))
        out[visual] = F.linear(mlp.act_fn(gate) * up, mlp.down_proj.weight[:, :m], mlp.down_proj.bias)
        return out


def _rows(bias, m):
    return None if bias is None else bias[:m]
