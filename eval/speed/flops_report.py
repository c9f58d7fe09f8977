"""FLOPs of full-size VLMs counted without weights, on the ``meta`` device.

The model is built from its ``config.json`` under ``torch.device("meta")`` (shapes only, no memory),
with eager attention so that the ``QK^T`` and ``PV`` matmuls are real ops. For each plan the
visual tokens per decoder layer are predicted with :func:`vtprune.stages.expected_tokens_per_layer`;
one decoder layer then runs under ``FlopCounterMode`` once per distinct sequence length
(``text_tokens`` + visual tokens of that layer, ``attention_mask=None`` so attention is counted
densely, as :func:`vtprune.flops.attention_flops` does) and the counts are summed over layers.
The vision tower and the projector run once on meta for one image and are reported apart.

The tower is reported per plan: its layers by formula (:func:`vtprune.flops.tower_linear_flops` +
:func:`vtprune.flops.tower_attention_flops` over each layer's attention sequences: the crops, the
image, or Qwen2.5-VL's windows in its window blocks), plus what the meta count finds outside the
layers (patch embedding, norms, position interpolation), which no plan changes; without a tower
stage the sum equals the meta count of the whole tower. A tower stage (``flowcut``) gives the
tokens per tower layer by its schedule (:meth:`vtprune.stages.TowerStage.expected_tower_units`);
FlowCut's schedule reads an entropy from the image at run time, so the estimate assumes one,
``tower_entropy`` (default 0: the most the schedule drops before its last pruning layer, hence
the least tower compute; 1: no drop until then). Qwen2.5-VL's windows shrink in proportion, and
the projector runs on the kept tokens. ``tower_share`` is the tower's part of the total.
Beside the count stands the papers' formula (:func:`vtprune.flops.paper_flops`: visual tokens
only, ``4nd^2 + 2n^2d + 3ndm`` per layer), which reproduces the published tables.

Shipped configurations (``vtprune/assets/configs/<name>/config.json``, written by
``save_pretrained`` from the published hub ``config.json`` numbers):

* ``llava-1.5-7b`` = ``llava-hf/llava-1.5-7b-hf``; ``llava-1.5-13b`` = ``llava-hf/llava-1.5-13b-hf``
* ``llava-next-7b`` = ``llava-hf/llava-v1.6-vicuna-7b-hf`` (the Vicuna-7B LLaVA-NeXT)
* ``qwen2-vl-2b`` = ``Qwen/Qwen2-VL-2B-Instruct``; ``qwen2-vl-7b`` = ``Qwen/Qwen2-VL-7B-Instruct``
* ``qwen2.5-vl-7b`` = ``Qwen/Qwen2.5-VL-7B-Instruct``; ``qwen3-vl-8b`` = ``Qwen/Qwen3-VL-8B-Instruct``
* ``llava-onevision-7b`` = ``llava-hf/llava-onevision-qwen2-7b-ov-hf`` (Qwen2-7B decoder, SigLIP-so400m
  tower of 26 layers, 384 px / 14 px crops, ``anyres_max_9``, tile grids up to 6 x 6)

Default image: one 336x336 image for LLaVA-1.5 (576 tokens), a 672x672 image for LLaVA-NeXT
(base + 2x2 crops with row newlines: 2928 tokens), a 448x448 image for Qwen2-VL (32x32 patches
merged 2x2: 256 tokens; the same image is 256 tokens on Qwen2.5-VL and, with 16-pixel patches,
196 on Qwen3-VL), a 768x768 image for LLaVA-OneVision (base + 2x2 tiles of 27x27 tokens with
row newlines, under the ``anyres_max_9`` cap: 3699 tokens). Qwen3-VL's projector column counts its
merger and its DeepStack mergers. ``image_size`` picks another image, ``visual_tokens`` overrides the
decoder's visual token count (the vision columns still describe the image).

Run: ``python -m vtprune.eval.speed.flops_report llava-1.5-7b --plans baseline "pdrop:layers=8+16+24,ratio=0.5"``.
"""

from __future__ import annotations

import argparse
import copy
import re
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoConfig, AutoModelForImageTextToText, PretrainedConfig

import vtprune
from vtprune.config import ModelInfo, config_from_name
from vtprune.eval.harness.plans import parse_plan
from vtprune.flops import paper_flops, tower_attention_flops, tower_linear_flops
from vtprune.integrations import adapter_for
from vtprune.stages import TowerStage, expected_tokens_per_layer

CONFIG_DIR = Path(vtprune.__file__).parent / "assets" / "configs"
#: shipped name -> the hub repository whose published config.json it reproduces
SHIPPED = {
    "llava-1.5-7b": "llava-hf/llava-1.5-7b-hf",
    "llava-1.5-13b": "llava-hf/llava-1.5-13b-hf",
    "llava-next-7b": "llava-hf/llava-v1.6-vicuna-7b-hf",
    "qwen2-vl-2b": "Qwen/Qwen2-VL-2B-Instruct",
    "qwen2-vl-7b": "Qwen/Qwen2-VL-7B-Instruct",
    "qwen2.5-vl-7b": "Qwen/Qwen2.5-VL-7B-Instruct",
    "qwen3-vl-8b": "Qwen/Qwen3-VL-8B-Instruct",
    "llava-onevision-7b": "llava-hf/llava-onevision-qwen2-7b-ov-hf",
}
QWEN = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
DEFAULT_IMAGE = {
    "llava_next": (672, 672),
    "llava_onevision": (768, 768),
    **{family: (448, 448) for family in QWEN},
}
ANYRES = ("llava_next", "llava_onevision")  # one image = base crop + tiles, sized by ``image_sizes``
BASELINE = ("baseline", "none", "")
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def config_source(model: str) -> str:
    """Where ``AutoConfig.from_pretrained`` should read ``model``: a shipped folder, a local folder, a hub id.

    Example:
        >>> Path(config_source("llava-1.5-7b")).name
        'llava-1.5-7b'
        >>> config_source("Qwen/Qwen2-VL-2B-Instruct")  # a hub id passes through (read when online)
        'Qwen/Qwen2-VL-2B-Instruct'
    """
    if model in SHIPPED:
        return str(CONFIG_DIR / model)
    if Path(model).is_dir():
        return model
    if _HUB_ID.match(model) and not model.startswith("."):
        return model
    raise ValueError(
        f"unknown model {model!r}: not a shipped config ({', '.join(SHIPPED)}), "
        "an existing folder with a config.json, or a hub id 'org/name'"
    )


def load_config(model) -> PretrainedConfig:
    """The config of ``model`` (a shipped name, folder, hub id, or a config object, returned as a copy).

    Example:
        >>> load_config("llava-1.5-7b").text_config.num_hidden_layers
        32
    """
    if isinstance(model, PretrainedConfig):
        return copy.deepcopy(model)
    source = config_source(str(model))
    try:
        return AutoConfig.from_pretrained(source)
    except OSError as err:  # hub id while offline, or a folder without config.json
        raise ValueError(
            f"cannot load a config for {model!r} ({err}); shipped configs work offline: {', '.join(SHIPPED)}"
        ) from err


def build_meta_model(config: PretrainedConfig):
    """The image-text-to-text model of ``config`` on the meta device, with eager attention everywhere.

    Example:
        >>> build_meta_model(load_config("qwen2-vl-2b")).device
        device(type='meta')
    """
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config, attn_implementation="eager")
    return model.eval()


def _image_call(adapter, image_size) -> tuple[dict, tuple[int, int] | None]:
    """A synthetic processor output for one image, for ``adapter.image_specs``."""
    cfg = adapter.config
    size = tuple(image_size or DEFAULT_IMAGE.get(adapter.family, ())) or None
    if adapter.family in QWEN:
        vc = cfg.vision_config
        unit = vc.patch_size * vc.spatial_merge_size
        grid = [1] + [max(unit, round(s / unit) * unit) // vc.patch_size for s in size]
        return {"image_grid_thw": torch.tensor([grid])}, size
    pixels = torch.empty(1, 3, 1, 1, device="meta")
    if adapter.family in ANYRES:
        return {"pixel_values": pixels, "image_sizes": torch.tensor([list(size)])}, size
    return {"pixel_values": pixels}, None


def count_decoder_layer(adapter, n_tokens: int, layer: int = 0) -> int:
    """FLOPs ``FlopCounterMode`` counts for decoder layer ``layer`` on ``n_tokens`` tokens (batch 1).

    Example:
        >>> ad = adapter_for(build_meta_model(load_config("llava-1.5-7b")))
        >>> count_decoder_layer(ad, 640)  # 2*640*(4d^2 + 3dm) + 4*640^2*d, d=4096, m=11008
        265751101440
    """
    h = torch.empty(1, n_tokens, adapter.text_config.hidden_size, device="meta")
    pos = adapter.prefill_position_ids(h)
    cos, sin = adapter.language_model.rotary_emb(h, pos)
    with FlopCounterMode(display=False) as counter:
        adapter.layers[layer](h, attention_mask=None, position_ids=pos, position_embeddings=(cos, sin))
    return counter.get_total_flops()


def _count(fn, *args, **kwargs) -> int:
    with FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    return counter.get_total_flops()


def _qwen_tower_data(adapter, grid: torch.Tensor) -> dict:
    """The index tensors a Qwen tower derives from ``grid`` (data, not shapes): computed on the CPU
    by transformers' own helpers and handed to the tower precomputed, on meta where the tower
    indexes meta tensors with them (rotary positions, Qwen2.5-VL's window order, Qwen3-VL's
    position-embedding interpolation taps)."""
    from transformers import vision_utils as vu

    vc = adapter.config.vision_config
    data = {"position_ids": vu.get_vision_position_ids(grid, vc.spatial_merge_size).to("meta")}
    if adapter.family == "qwen2_5_vl":
        index, cu_windows = vu.get_vision_window_index(
            grid, vc.spatial_merge_size, vc.window_size, vc.patch_size
        )
        data.update(window_index=index.to("meta"), cu_window_seqlens=cu_windows)
    if adapter.family == "qwen3_vl":
        tower = adapter.mm_model.visual
        taps, weights = vu.get_vision_interpolation_indices_and_weights(
            grid,
            num_grid_per_side=tower.num_grid_per_side,
            mode=tower.interpolation_mode,
            align_corners=tower.interpolation_align_corners,
            spatial_merge_size=vc.spatial_merge_size,
        )
        data.update(interp_indices=taps.to("meta"), interp_weights=weights.to("meta"))
    return data


def count_vision(adapter, call: dict) -> tuple[int, int]:
    """(vision tower FLOPs, projector FLOPs) for the image described by ``call``, counted on meta."""
    mm, vc = adapter.mm_model, adapter.config.vision_config
    if adapter.family in QWEN:
        grid = call["image_grid_thw"]
        n = int(grid.prod(-1).sum())
        pixels = torch.empty(n, 3 * vc.temporal_patch_size * vc.patch_size**2, device="meta")
        total = _count(mm.visual, pixels, grid_thw=grid, **_qwen_tower_data(adapter, grid))
        # the mergers' input width: Qwen2-VL calls the tower width embed_dim, later towers hidden_size
        width = getattr(vc, "embed_dim", None) or vc.hidden_size
        mergers = [mm.visual.merger, *getattr(mm.visual, "deepstack_merger_list", ())]
        proj = sum(_count(m, torch.empty(n, width, device="meta")) for m in mergers)
        return total - proj, proj
    crops = 1
    if adapter.family in ANYRES:
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        size = call["image_sizes"][0].tolist()
        crops = image_size_to_num_patches(size, adapter.config.image_grid_pinpoints, vc.image_size)
    tower = _count(mm.vision_tower, torch.empty(crops, 3, vc.image_size, vc.image_size, device="meta"))
    layers = adapter.config.vision_feature_layer
    width = vc.hidden_size * (len(layers) if isinstance(layers, (list, tuple)) else 1)
    side = vc.image_size // vc.patch_size
    tokens = side * side + (adapter.config.vision_feature_select_strategy == "full" and adapter.has_cls)
    proj = _count(mm.multi_modal_projector, torch.empty(crops, tokens, width, device="meta"))
    return tower, proj


def tower_sequences(adapter, call: dict) -> tuple[list[list[int]], int, int, int]:
    """The unpruned tower's attention sequences per layer, and ``(units, per_unit, extra)``:
    a sequence holds ``units * per_unit + extra`` tokens (CLIP: 576 patches + CLS per crop;
    Qwen: merge groups of 4 patches per image; SigLIP: 729 patches per crop).

    Example:
        >>> ad = adapter_for(build_meta_model(load_config("llava-1.5-7b")))
        >>> seqs, units, per_unit, extra = tower_sequences(ad, _image_call(ad, None)[0])
        >>> len(seqs), seqs[0], units, per_unit, extra
        (24, [577], 576, 1, 1)
    """
    vc, depth = adapter.config.vision_config, adapter.vision_layers_count
    if adapter.family in QWEN:
        grid = call["image_grid_thw"]
        group = adapter.patches_per_token
        images = [int(g.prod()) for g in grid]
        seqs = [list(images) for _ in range(depth)]
        if adapter.family == "qwen2_5_vl":
            from transformers import vision_utils as vu

            _, cu = vu.get_vision_window_index(grid, vc.spatial_merge_size, vc.window_size, vc.patch_size)
            windows = [w for w in torch.as_tensor(cu).diff().tolist() if w > 0]
            full = set(vc.fullatt_block_indexes)
            seqs = [list(images) if i in full else list(windows) for i in range(depth)]
        return seqs, images[0] // group, group, 0
    crops = 1
    if adapter.family in ANYRES:
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        size = call["image_sizes"][0].tolist()
        crops = image_size_to_num_patches(size, adapter.config.image_grid_pinpoints, vc.image_size)
    side = vc.image_size // vc.patch_size
    cls = int(adapter.has_cls)
    return [[side * side + cls] * crops for _ in range(depth)], side * side, 1, cls


def tower_plan_flops(adapter, seqs, units, per_unit, extra, stage=None, entropy: float = 0.0):
    """``(layer FLOPs, tokens per layer per sequence, kept fraction at the projector)`` of the
    tower's layers under ``stage`` (a tower stage, or ``None`` for the unpruned tower)."""
    vc, depth = adapter.config.vision_config, adapter.vision_layers_count
    counts = [units] * depth
    final = units
    if stage is not None:
        # packed towers without CLS (Qwen) may drop after the last block, before the merger
        feature = adapter.vision_feature_layer() if adapter.tower_tokens_per_crop is not None else depth
        counts = stage.expected_tower_units(units, feature, depth, entropy)
        final = stage.expected_count(units)
    scaled = [[n * c / units for n in layer] for layer, c in zip(seqs, counts)]
    if per_unit == 1:  # whole tokens per sequence: CLS stays whole, patches scale
        scaled = [[c * per_unit + extra for _ in layer] for layer, c in zip(seqs, counts)]
    tokens = [sum(layer) for layer in scaled]
    flops = tower_linear_flops(vc, tokens) + tower_attention_flops(vc, scaled)
    return flops, [c * per_unit + extra for c in counts], final / units


def _tower_stage(stages: list):
    found = [s for s in stages if isinstance(s, TowerStage)]
    return found[0] if found else None


def plan_stages(plan: str, info: ModelInfo) -> list:
    """Stages of a plan string (``"baseline"`` -> none), parsed by :func:`vtprune.eval.harness.plans.parse_plan`.

    Example:
        >>> [s.key for s in plan_stages("pdrop:layers=8+16+24,ratio=0.5", ModelInfo(32, "llava"))]
        ['pdrop@8', 'pdrop@16', 'pdrop@24']
    """
    if plan.strip().lower() in BASELINE:
        return []
    name, opts = parse_plan(plan.strip())
    return config_from_name(name, **opts).stages(info)


def flops_report(
    model,
    plans: list[str],
    visual_tokens=None,
    text_tokens: int = 64,
    image_size=None,
    tower_entropy: float = 0.0,
) -> dict:
    """FLOPs of one prompt (one image + ``text_tokens``) under each plan, counted on the meta device.

    ``model`` is a shipped name (see ``SHIPPED``), a folder with a ``config.json``, a hub id or a
    config object. TFLOPs: ``paper_tflops`` (the papers' formula on visual tokens only; it counts
    one FLOP per multiply-add, so it is about half the counted figure), ``decoder_tflops``
    (counted, visual + text tokens, all decoder layers, two FLOPs per multiply-add),
    ``vision_tower_tflops`` and ``projector_tflops`` (counted once for the image; ``None`` with
    ``vision_error`` saying why when they cannot be run on meta), ``total_tflops`` (their sum).
    Per plan the tower is counted again under its tower stage, if any (``vision_tower_tflops``,
    ``projector_tflops``, ``tower_tokens_per_layer`` per crop / image, ``tower_share`` of the
    total; ``tower_entropy`` is the schedule's assumed entropy, see the module docstring).

    Example:
        >>> rep = flops_report("llava-1.5-7b", ["baseline", "pdrop:layers=8+16+24,ratio=0.5"])
        >>> [round(p["paper_tflops"], 2) for p in rep["plans"]]
        [3.82, 1.78]
    """
    config = load_config(model)
    meta = build_meta_model(config)
    adapter = adapter_for(meta)
    call, size = _image_call(adapter, image_size)
    n_visual = int(visual_tokens) if visual_tokens is not None else adapter.image_specs(call)[0].num_tokens
    tower = proj = vision_error = layout = None
    try:
        tower, proj = count_vision(adapter, call)
        layout = tower_sequences(adapter, call)
        outside = tower - tower_plan_flops(adapter, *layout)[0]  # patch embedding, norms: every plan's
    except Exception as err:  # an unfamiliar vision tower only loses the vision columns
        vision_error = f"{type(err).__name__}: {err}"
    info = ModelInfo(num_layers=adapter.num_layers, family=adapter.family)
    tc = adapter.text_config
    cache: dict[int, int] = {}
    rows = []
    for plan in plans:
        stages = plan_stages(plan, info)
        per_layer = expected_tokens_per_layer(stages, n_visual, info.num_layers)
        decoder = 0
        for i, n in enumerate(per_layer):
            if n + text_tokens not in cache:  # decoder layers of one model share their shapes
                cache[n + text_tokens] = count_decoder_layer(adapter, n + text_tokens, i)
            decoder += cache[n + text_tokens]
        plan_tower, plan_proj, tower_tokens = tower, proj, None
        if layout is not None:
            layers, tower_tokens, kept = tower_plan_flops(
                adapter, *layout, stage=_tower_stage(stages), entropy=tower_entropy
            )
            plan_tower, plan_proj = outside + layers, proj * kept
        vision = (plan_tower or 0) + (plan_proj or 0)
        rows.append(
            {
                "plan": plan,
                "visual_tokens_per_layer": per_layer,
                "llm_input_visual_tokens": per_layer[0],
                "equivalent_tokens": sum(per_layer) / len(per_layer),
                "paper_tflops": paper_flops(per_layer, tc.hidden_size, tc.intermediate_size) / 1e12,
                "decoder_flops": decoder,
                "decoder_tflops": decoder / 1e12,
                "total_tflops": (decoder + vision) / 1e12,
                "vision_tower_tflops": None if plan_tower is None else plan_tower / 1e12,
                "projector_tflops": None if plan_proj is None else plan_proj / 1e12,
                "tower_tokens_per_layer": tower_tokens,
                "tower_share": None if plan_tower is None else plan_tower / (decoder + vision),
            }
        )
    return {
        "model": model if isinstance(model, str) else type(config).__name__,
        "architecture": type(meta).__name__,
        "family": adapter.family,
        "num_layers": info.num_layers,
        "hidden_size": tc.hidden_size,
        "intermediate_size": tc.intermediate_size,
        "image_size": list(size) if size else None,
        "visual_tokens": n_visual,
        "text_tokens": text_tokens,
        "vision_tower_tflops": None if tower is None else tower / 1e12,
        "projector_tflops": None if proj is None else proj / 1e12,
        "vision_error": vision_error,
        "tower_entropy": tower_entropy,
        "plans": rows,
    }


def format_flops_table(report: dict) -> str:
    """A Markdown caption and table of a :func:`flops_report` result.

    Example:
        >>> print(format_flops_table(flops_report("llava-1.5-7b", ["baseline"])).splitlines()[-1])
        | baseline | 576 | 576.0 | 3.82 | 8.50 | 0.38 | 0.02 | 8.91 | 4.3% |
    """

    def tf(x):
        return "n/a" if x is None else f"{x:.2f}"

    def share(x):
        return "n/a" if x is None else f"{100 * x:.1f}%"

    image = "x".join(map(str, report["image_size"])) + " image, " if report["image_size"] else ""
    lines = [
        f"**{report['model']}** ({report['architecture']}, {report['num_layers']} layers, "
        f"d={report['hidden_size']}, m={report['intermediate_size']}): {image}{report['visual_tokens']} visual + "
        f"{report['text_tokens']} text tokens. TFLOPs; paper = the papers' formula on visual tokens only "
        "(one per multiply-add); counted = FlopCounterMode on meta, visual + text tokens (two per multiply-add, "
        "attention dense); vision tower = its layers by formula + the rest counted, per plan (a tower stage's "
        f"schedule at entropy {report.get('tower_entropy', 0.0):g}); tower share = tower / total",
        "",
        "| plan | LLM input visual | equiv. visual tokens | paper | counted decoder | vision tower | projector "
        "| counted total | tower share |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in report["plans"]:
        lines.append(
            f"| {p['plan']} | {p['llm_input_visual_tokens']} | {p['equivalent_tokens']:.1f} | {tf(p['paper_tflops'])} "
            f"| {tf(p['decoder_tflops'])} | {tf(p['vision_tower_tflops'])} | {tf(p['projector_tflops'])} "
            f"| {tf(p['total_tflops'])} | {share(p['tower_share'])} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help=f"shipped name ({', '.join(SHIPPED)}), local folder or hub id")
    ap.add_argument("--plans", nargs="+", default=["baseline"])
    ap.add_argument("--visual-tokens", type=int, default=None)
    ap.add_argument("--text-tokens", type=int, default=64)
    ap.add_argument("--tower-entropy", type=float, default=0.0, help="tower stage schedule's assumed entropy")
    args = ap.parse_args(argv)
    rep = flops_report(
        args.model, args.plans, args.visual_tokens, args.text_tokens, tower_entropy=args.tower_entropy
    )
    print(format_flops_table(rep))


if __name__ == "__main__":
    main()
