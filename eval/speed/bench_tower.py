"""Tower benchmark: vision-tower time and FLOPs under a tower stage (flowcut) at keep 50/25/11%.

Two tower shapes, random weights, at a reduced width so one run fits a small CPU:

* ``llava_next``: LLaVA-NeXT's tower work, a CLIP-L/336 tower (24 layers, 577 tokens a crop,
  features from layer -2) on the five 336 px crops of one 672x672 image. FlowCut does not run on
  LLaVA-NeXT here yet, so this is the LLaVA-1.5 tower stage on a batch of five images, which is
  exactly what LLaVA-NeXT's tower runs (each crop scheduled and kept on its own);
* ``qwen2_vl``: Qwen2-VL's tower (32 blocks, 14 px patches, 2x2 merge) on one 448x448 image
  (1024 patches, 256 tokens).

What is timed is the image encoder alone (``get_image_features``: tower and projector / merger),
with the paired-baseline method of :func:`vtprune.eval.speed.bench_prefill.time_plans`. The
FLOPs-allowed speedup is (matmul FLOPs counted by ``FlopCounterMode`` + tower attention by
formula on the tokens each layer ran on, as recorded by ``vtprune.stats``) unpruned / pruned.

Random weights give a near-uniform CLS row (normalised entropy close to 1), on which FlowCut's
schedule drops nothing until its last pruning layer; a trained tower's row is peaked. The query
and key weights are therefore scaled (``SHARPEN``: 16 on CLIP; 100 on Qwen2-VL, whose mean-query
row averages the random queries out; ``--sharpen`` sets both) so the schedule drops tokens
progressively, as on a trained tower; timing does not depend on weight values, only the schedule
does, and the tokens per layer are reported.

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
SHARPEN = {"llava_next": 16.0, "qwen2_vl": 100.0}  # query/key weight scale per shape (see above)
CROPS = 5  # LLaVA-NeXT at 672x672: the base image and 2 x 2 crops, 336 px each
TEXT = 8  # text tokens beside the image in the one prefill that reads the tower's token counts


def llava_next_tower_model(width: int, seed: int = 0, layers: int = 24, image_size: int = 336):
    """A LLaVA model whose tower is CLIP-L/336's shape at ``width`` (heads of 64, MLP 4x), with a
    one-layer width-64 decoder (only the tower and the projector are timed). ``layers`` and
    ``image_size`` shrink it for tests."""
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    cfg = llava_config(64, 1, vocab=1000, image_token_id=999)
    cfg.vision_config = CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=layers,
        num_attention_heads=max(1, width // 64),
        image_size=image_size,
        patch_size=14,
    )
    model = LlavaForConditionalGeneration(cfg).eval()
    model.set_attn_implementation("sdpa")
    return model


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
    """The image encoder alone: tower and projector (LLaVA) or merger (Qwen2-VL)."""
    with torch.inference_mode():
        if "image_grid_thw" in kw:
            return model.model.get_image_features(kw["pixel_values"], image_grid_thw=kw["image_grid_thw"])
        return model.model.get_image_features(pixel_values=kw["pixel_values"])


def tower_tokens(model, kw, plan: str, depth: int) -> list[float]:
    """Tokens each tower layer ran on, summed over the crops (read from one prefill's stats)."""
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
        llava_next_tower_model,
        lambda: llava_inputs(),
        "LLaVA-NeXT tower work: CLIP-L/336 shape (24 layers, 577 tokens a crop, features from layer -2) "
        "on the five 336 px crops of one 672x672 image, run as a batch of five images with the "
        "LLaVA-1.5 tower stage (exactly the batch LLaVA-NeXT's tower runs; FlowCut's NeXT runner adds only the crop budgets)",
    ),
    "qwen2_vl": (
        qwen2_vl_tower_model,
        lambda: build_qwen_inputs(1, "image", text_tokens=TEXT + 7),
        "Qwen2-VL tower shape (32 blocks, 14 px patches, 2x2 merge) on one 448x448 image "
        "(1024 patches, 256 tokens)",
    ),
}


def markdown(report: dict) -> str:
    lines = [
        f"# Vision-tower benchmark ({report['machine']})",
        "",
        f"Random weights, query/key weights scaled by {report['sharpen']}; threads={report['threads']}, "
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
    ap.add_argument("--shapes", default="llava_next,qwen2_vl", help="comma-separated: llava_next, qwen2_vl")
    ap.add_argument("--keeps", default=",".join(map(str, KEEPS)), help="flowcut keep fractions")
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
    plans = ["baseline"] + [f"flowcut:keep={k}" for k in args.keeps.split(",") if k]
    widths = {"llava_next": args.llava_width, "qwen2_vl": args.qwen_width}
    report = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}",
        "widths": {s: widths[s] for s in shapes},
        "sharpen": {s: args.sharpen or SHARPEN[s] for s in shapes},
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
        "repeats": args.repeats,
        "warmup": args.warmup,
        "baseline_every": args.baseline_every,
        "results": {},
    }
    for shape in shapes:
        build, inputs, _ = SHAPES[shape]
        model = build(widths[shape])
        sharpen(model, report["sharpen"][shape])
        report["results"][shape] = measure(
            model, inputs(), plans, args.repeats, args.warmup, args.baseline_every
        )
    publish_benchmark(report, markdown(report), args.out, "tower_bench")
    return report


if __name__ == "__main__":
    main()
