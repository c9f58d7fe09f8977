"""Tower benchmark: vision-tower time and FLOPs under the tower stages (flowcut, zerotprune) at
keep 50/25/11%.

Tower shapes, random weights, at a reduced width so one run fits a small CPU:

* ``llava_next``: a ``LlavaNextForConditionalGeneration`` with a CLIP-L/336-shaped tower (24
  layers, 577 tokens a crop, features from layer -2) and LLaVA-NeXT's grid pinpoints, on one
  672x672 image: five 336 px crops (base and 2 x 2), run through the LLaVA-NeXT tower runner
  (``vtprune.runtime.tower_next``: the image's budget split over its crops, survivors put back
  on the crop grids before packing);
* ``llava15_five_crops``: the rows measured before that runner existed: the same CLIP tower in a
  LLaVA-1.5 model on a batch of five 336 px images (the LLaVA-1.5 tower stage, each crop its own
  image and budget). Kept so the older tables (``results/tower``) stay reproducible;
* ``qwen2_vl``: Qwen2-VL's tower (32 blocks, 14 px patches, 2x2 merge) on one 448x448 image
  (1024 patches, 256 tokens).

What is timed is the image encoder alone (``get_image_features``: tower and projector / merger,
and LLaVA-NeXT's packing), with the paired-baseline method of
:func:`vtprune.eval.speed.bench_prefill.time_plans`. The
FLOPs-allowed speedup is (matmul FLOPs counted by ``FlopCounterMode`` + tower attention by
formula on the tokens each layer ran on, as recorded by ``vtprune.stats``, the crops taken as
equal in size) unpruned / pruned.

Random weights give a near-uniform CLS row (normalised entropy close to 1), on which FlowCut's
schedule drops nothing until its last pruning layer; a trained tower's row is peaked. The query
and key weights are therefore scaled (``SHARPEN``: 16 on CLIP; 100 on Qwen2-VL, whose mean-query
row averages the random queries out; ``--sharpen`` sets both) so the schedule drops tokens
progressively, as on a trained tower; timing does not depend on weight values, only the schedule
does, and the tokens per layer are reported.

Zero-TPrune's default layer is the one before the feature layer, so at its defaults it saves
little tower compute (one CLIP layer, or the Qwen2-VL merger's input); ``--methods`` takes
options per method (``zerotprune:layers=5+11+17``) to time earlier schedules.

Run: ``python -m vtprune.eval.speed.bench_tower --out results/tower`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import os
import platform

import torch
from transformers import CLIPVisionConfig

import vtprune
from vtprune.eval.harness.plans import apply_plan
from vtprune.eval.harness.reports import publish_benchmark
from vtprune.eval.speed.bench_prefill import QWEN_IMAGE, QWEN_VSTART, build_qwen_inputs, time_plans
from vtprune.eval.speed.shapes import llava_config
from vtprune.flops import count_flops, tower_attention_flops

KEEPS = (0.5, 0.25, 0.11)
METHODS = ("flowcut", "zerotprune")
# query/key weight scale per shape (see above)
SHARPEN = {"llava_next": 16.0, "llava15_five_crops": 16.0, "qwen2_vl": 100.0}
CROPS = 5  # LLaVA-NeXT at 672x672: the base image and 2 x 2 crops, 336 px each
TEXT = 8  # text tokens beside the image in the one prefill that reads the tower's token counts


def clip_tower_config(width: int, layers: int = 24, image_size: int = 336) -> CLIPVisionConfig:
    """CLIP-L/336's shape at ``width`` (heads of 64, MLP 4x, 14 px patches)."""
    return CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=layers,
        num_attention_heads=max(1, width // 64),
        image_size=image_size,
        patch_size=14,
    )


def llava_next_tower_model(width: int, seed: int = 0, layers: int = 24, image_size: int = 336):
    """A LLaVA (1.5) model whose tower is :func:`clip_tower_config`, with a one-layer width-64
    decoder (only the tower and the projector are timed). ``layers`` and ``image_size`` shrink it
    for tests. The ``llava15_five_crops`` shape."""
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    cfg = llava_config(64, 1, vocab=1000, image_token_id=999)
    cfg.vision_config = clip_tower_config(width, layers, image_size)
    model = LlavaForConditionalGeneration(cfg).eval()
    model.set_attn_implementation("sdpa")
    return model


def llava_next_model(width: int, seed: int = 0, layers: int = 24, image_size: int = 336):
    """A ``LlavaNextForConditionalGeneration`` with the tower of :func:`clip_tower_config`,
    LLaVA-NeXT's grid pinpoints (in units of ``image_size``: 1x2, 2x1, 2x2, 3x1, 1x3 crops),
    features from layer -2 with the "default" strategy, and a one-layer width-64 decoder.

    Example:
        >>> m = llava_next_model(64, layers=2, image_size=56)
        >>> type(m).__name__, m.config.image_grid_pinpoints[2]
        ('LlavaNextForConditionalGeneration', [112, 112])
    """
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    torch.manual_seed(seed)
    s = image_size
    cfg = LlavaNextConfig(
        vision_config=clip_tower_config(width, layers, image_size),
        text_config=llava_config(64, 1, vocab=1000, image_token_id=999).text_config,
        image_token_id=999,
        image_grid_pinpoints=[[s, 2 * s], [2 * s, s], [2 * s, 2 * s], [3 * s, s], [s, 3 * s]],
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    model = LlavaNextForConditionalGeneration(cfg).eval()
    model.set_attn_implementation("sdpa")
    return model


def llava_next_inputs(model, seed: int = 0) -> dict:
    """One ``2s x 2s`` image (``s`` the crop size): the base crop and 2 x 2 grid crops, nothing
    cut by unpadding; its placeholders as the processor counts them (patches and row newlines).

    Example:
        >>> kw = llava_next_inputs(llava_next_model(64, layers=2, image_size=56))
        >>> tuple(kw["pixel_values"].shape), int((kw["input_ids"] == 999).sum())  # 16 + 8 x 8 + 8
        ((1, 5, 3, 56, 56), 88)
    """
    from vtprune.integrations.llava_next import LlavaNextAdapter

    s = model.config.vision_config.image_size
    gen = torch.Generator().manual_seed(seed)
    n = LlavaNextAdapter(model)._spec([2 * s, 2 * s]).num_tokens
    ids = torch.cat([torch.full((1, n), 999), torch.randint(3, 900, (1, TEXT), generator=gen)], 1)
    pixels = torch.randn(1, CROPS, 3, s, s, generator=gen)
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": pixels,
        "image_sizes": torch.tensor([[2 * s, 2 * s]]),
    }


def qwen2_vl_tower_model(width: int, seed: int = 0, depth: int = 32):
    """A Qwen2-VL model whose tower is Qwen2-VL's shape at ``width`` (32 blocks, heads of 64,
    MLP 4x, 14 px patches, 2x2 merge), with a one-layer width-128 decoder (``depth`` shrinks it)."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from vtprune.eval.speed.bench_prefill import QWEN_VIDEO

    torch.manual_seed(seed)
    text = dict(
        vocab_size=1000,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [8, 12, 12]},
        bos_token_id=1,
        eos_token_id=2,
    )
    vision = dict(
        depth=depth,
        embed_dim=width,
        hidden_size=128,
        num_heads=max(1, width // 64),
        mlp_ratio=4,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
    )
    cfg = Qwen2VLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=QWEN_IMAGE,
        video_token_id=QWEN_VIDEO,
        vision_start_token_id=QWEN_VSTART,
    )
    model = Qwen2VLForConditionalGeneration(cfg).eval()
    model.set_attn_implementation("sdpa")
    return model


def sharpen(model, factor: float) -> None:
    """Scale the tower's query and key weights by ``factor`` (attention logits by ``factor^2``)."""
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "q_proj") and hasattr(module, "k_proj") and hasattr(module, "out_proj"):
                module.q_proj.weight.mul_(factor)
                module.k_proj.weight.mul_(factor)
            elif hasattr(module, "qkv") and hasattr(module, "proj"):  # Qwen2-VL: q, k, v stacked
                width = module.qkv.weight.shape[1]
                module.qkv.weight[: 2 * width].mul_(factor)


def llava_inputs(seed: int = 0, image_size: int = 336) -> dict:
    """Five rows, one 336 px image each: the tower runs the five crops as one batch.

    Example:
        >>> kw = llava_inputs(image_size=56)  # 4 x 4 patches per crop, 8 text tokens
        >>> tuple(kw["input_ids"].shape), tuple(kw["pixel_values"].shape)
        ((5, 24), (5, 3, 56, 56))
    """
    gen = torch.Generator().manual_seed(seed)
    n = (image_size // 14) ** 2
    ids = torch.cat([torch.full((CROPS, n), 999), torch.randint(3, 900, (CROPS, TEXT), generator=gen)], 1)
    pixels = torch.randn(CROPS, 3, image_size, image_size, generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}


def encode(model, kw):
    """The image encoder alone: tower and projector (LLaVA; LLaVA-NeXT with its packing) or
    merger (Qwen2-VL)."""
    with torch.inference_mode():
        if "image_grid_thw" in kw:
            return model.model.get_image_features(kw["pixel_values"], image_grid_thw=kw["image_grid_thw"])
        if "image_sizes" in kw:
            return model.model.get_image_features(
                pixel_values=kw["pixel_values"], image_sizes=kw["image_sizes"]
            )
        return model.model.get_image_features(pixel_values=kw["pixel_values"])


def tower_tokens(model, kw, plan: str, depth: int) -> list[float]:
    """Tokens each tower layer ran on, summed over the crops (read from one prefill's stats:
    per image, which on LLaVA-NeXT is already the sum over its crops)."""
    if plan == "baseline":
        if "image_grid_thw" in kw:
            return [float(kw["image_grid_thw"].prod())] * depth
        vc = model.config.vision_config
        return [float(CROPS * ((vc.image_size // vc.patch_size) ** 2 + 1))] * depth
    with torch.inference_mode():
        model(**kw, logits_to_keep=1)
    per_image = vtprune.stats(model).tower_tokens_per_layer
    rows = kw["input_ids"].shape[0]
    return [n * rows for n in per_image]


def plan_names(methods: list[str], keeps: list[float]) -> list[str]:
    """``baseline``, then each keep's plan of every method (``method`` or ``method:options``).

    Example:
        >>> plan_names(["flowcut", "zerotprune:layers=5+11"], [0.5])
        ['baseline', 'flowcut:keep=0.5', 'zerotprune:layers=5+11,keep=0.5']
    """
    return ["baseline"] + [f"{m}{',' if ':' in m else ':'}keep={k}" for k in keeps for m in methods]


def measure(model, kw, plans: list[str], repeats: int, warmup: int, baseline_every: int) -> dict:
    """FLOPs and tokens of every plan's encoder run, then the paired timing of all of them."""
    vc = model.config.vision_config
    depth = getattr(vc, "depth", None) or vc.num_hidden_layers
    sequences = 1 if "image_grid_thw" in kw else CROPS
    counts = {}
    for plan in plans:
        apply_plan(model, plan)
        matmuls, _ = count_flops(encode, model, kw)
        tokens = tower_tokens(model, kw, plan, depth)
        attention = tower_attention_flops(vc, [[n / sequences] * sequences for n in tokens])
        counts[plan] = dict(counted_flops=matmuls, attention_flops=attention, tower_tokens_per_layer=tokens)
    vtprune.remove(model)
    results = time_plans(model, kw, plans, repeats, warmup, baseline_every, run=encode)
    base = counts["baseline"]["counted_flops"] + counts["baseline"]["attention_flops"]
    for plan in plans:
        r = results[plan]
        r.pop("overheads")
        r.update(counts[plan])
        r["flops_speedup"] = base / (r["counted_flops"] + r["attention_flops"])
        r["share_of_allowed"] = r["measured_speedup"] / r["flops_speedup"]
        r["paired_speedups"] = [round(x, 4) for x in r["paired_speedups"]]
    return results


SHAPES = {
    "llava_next": (
        llava_next_model,
        llava_next_inputs,
        "LLaVA-NeXT (`LlavaNextForConditionalGeneration`, grid pinpoints up to 2x2 crops): CLIP-L/336 "
        "shape (24 layers, 577 tokens a crop, features from layer -2) on one 672x672 image, five 336 px "
        "crops (base and 2 x 2) through the LLaVA-NeXT tower runner (the image's budget split over its "
        "crops); timed: tower, projector and packing (unpadding, newlines)",
    ),
    "llava15_five_crops": (
        llava_next_tower_model,
        lambda model: llava_inputs(),
        "LLaVA-NeXT tower work: CLIP-L/336 shape (24 layers, 577 tokens a crop, features from layer -2) "
        "on the five 336 px crops of one 672x672 image, run as a batch of five images with the "
        "LLaVA-1.5 tower stage (each crop its own image and budget; not the NeXT runner)",
    ),
    "qwen2_vl": (
        qwen2_vl_tower_model,
        lambda model: build_qwen_inputs(1, "image", text_tokens=TEXT + 7),
        "Qwen2-VL tower shape (32 blocks, 14 px patches, 2x2 merge) on one 448x448 image "
        "(1024 patches, 256 tokens)",
    ),
}


def markdown(report: dict) -> str:
    lines = [
        f"# Vision-tower benchmark ({report['machine']})",
        "",
        f"Random weights, query/key weights scaled by {report['sharpen']}; plans: "
        f"{', '.join(report.get('methods', ['flowcut']))} at keep {report.get('keeps', list(KEEPS))}; threads={report['threads']}, "
        f"OMP_WAIT_POLICY={report['omp_wait_policy']}; {report['repeats']} interleaved repeats after "
        f"{report['warmup']} warm-up runs; the baseline is re-timed around every {report['baseline_every']} plans. "
        "Timed: the image encoder alone (tower + projector / merger).",
    ]
    for shape, res in report["results"].items():
        lines += [
            "",
            f"## {shape}: width {report['widths'][shape]}",
            "",
            SHAPES[shape][2] + ".",
            "",
            "| plan | tower tokens, first / last layer | tokens per layer (mean) | median encoder (s) "
            "| measured speedup | FLOPs-allowed speedup | share of allowed |",
            "|---|---|---|---|---|---|---|",
        ]
        for plan, r in res.items():
            t = r["tower_tokens_per_layer"]
            lines.append(
                f"| `{plan}` | {t[0]:.0f} / {t[-1]:.0f} | {sum(t) / len(t):.0f} | {r['median_s']:.3f} "
                f"| {r['measured_speedup']:.2f}x | {r['flops_speedup']:.2f}x | {100 * r['share_of_allowed']:.1f}% |"
            )
    lines += [
        "",
        "Measured speedup = median over the repeats of (mean of the two baseline runs timed just before and "
        "after the plan's group) / (the plan's run). FLOPs-allowed speedup = (counted matmul FLOPs + tower "
        "attention `4 n^2 d` per crop and layer, on the recorded tokens) unpruned / the same for the plan; "
        "`torch.utils.flop_counter` does not count CPU SDPA kernels, hence the formula. Target: 95% of allowed.",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="llava_next,qwen2_vl", help=f"comma-separated: {', '.join(SHAPES)}")
    ap.add_argument("--keeps", default=",".join(map(str, KEEPS)), help="keep fractions")
    ap.add_argument(
        "--methods",
        default=",".join(METHODS),
        help="comma-separated tower-stage methods, each optionally with options "
        "('zerotprune:layers=5+11+17'); every one runs at every keep",
    )
    ap.add_argument("--llava-width", type=int, default=256, help="CLIP tower width (real: 1024)")
    ap.add_argument("--qwen-width", type=int, default=256, help="Qwen2-VL tower width (real: 1280)")
    ap.add_argument(
        "--sharpen",
        type=float,
        default=None,
        help="scale of the tower's query/key weights (default: SHARPEN)",
    )
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--baseline-every", type=int, default=3)
    ap.add_argument("--out", default=None, help="folder for tower_bench.json / .md")
    ap.add_argument("--quick", action="store_true", help="width 64, 2 repeats: a smoke run")
    args = ap.parse_args(argv)
    shapes = [s for s in args.shapes.split(",") if s]
    for s in shapes:
        if s not in SHAPES:
            ap.error(f"--shapes: unknown shape {s!r}; allowed: {', '.join(SHAPES)}")
    for name in ("repeats", "baseline_every", "llava_width", "qwen_width"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.quick:
        args.llava_width, args.qwen_width, args.repeats, args.warmup = 64, 64, 2, 1
    keeps = [float(k) for k in args.keeps.split(",") if k]
    methods = [m for m in args.methods.split(",") if m]
    if not methods:
        ap.error(f"--methods: at least one method is needed, got {args.methods!r}")
    plans = plan_names(methods, keeps)
    widths = {
        "llava_next": args.llava_width,
        "llava15_five_crops": args.llava_width,
        "qwen2_vl": args.qwen_width,
    }
    report = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}",
        "widths": {s: widths[s] for s in shapes},
        "sharpen": {s: args.sharpen or SHARPEN[s] for s in shapes},
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
        "repeats": args.repeats,
        "warmup": args.warmup,
        "baseline_every": args.baseline_every,
        "methods": methods,
        "keeps": keeps,
        "results": {},
    }
    for shape in shapes:
        build, inputs, _ = SHAPES[shape]
        model = build(widths[shape])
        sharpen(model, report["sharpen"][shape])
        report["results"][shape] = measure(
            model, inputs(model), plans, args.repeats, args.warmup, args.baseline_every
        )
    publish_benchmark(report, markdown(report), args.out, "tower_bench")
    return report


if __name__ == "__main__":
    main()
