"""Prefill benchmark: measured speedup of each plan next to the speedup its FLOPs allow.

A LLaVA-1.5-shaped model (576 visual tokens, 32 decoder layers, reduced width so it runs on
a CPU, random weights) runs prefill (``logits_to_keep=1``, as ``generate`` does) unpruned and
under each plan, batch 1 and 4. Runs are interleaved in one process, warmed up, and the median
of the repeats is reported with the thread settings, because CPU timings on small machines are
only meaningful that way (see EVAL.md).

Run: ``python -m vtprune.eval.speed.bench_prefill --out results/prefill`` (``--quick`` for a smoke run).
With ``--out``, the FLOPs counts and every finished repeat are saved to
``<out>/prefill_bench.partial.json`` as the run goes; ``--resume`` continues from that file (same
settings, warm-up again, the remaining repeats only), so a long run killed midway loses at most
the repeat in progress. The file is removed once the table is written.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

import vtprune
from vtprune.eval.harness.plans import apply_plan
from vtprune.eval.harness.reports import publish_benchmark
from vtprune.eval.speed.shapes import llava_config
from vtprune.flops import attention_flops, count_flops

DEFAULT_PLANS = [
    "baseline",
    "fastv:layer=2,keep=0.25",
    "pdrop:layers=8+16+24,ratio=0.5",
]


def build_model(width: int, layers: int, seed: int = 0, tower_layers: int = 2):
    """LLaVA-1.5 token geometry at a reduced width (random weights), with a ``tower_layers``-deep
    width-64 CLIP tower (see :func:`~vtprune.eval.speed.shapes.llava_config`)."""
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(llava_config(width, layers, tower_layers=tower_layers)).eval()
    model.set_attn_implementation("sdpa")
    return model


# Qwen2.5-VL-shaped model: token ids inside the small vocabulary (the real ones are ~151k)
QWEN_VSTART, QWEN_VEND, QWEN_IMAGE, QWEN_VIDEO = 995, 996, 997, 998
QWEN_PATCH, QWEN_MERGE, QWEN_TUBELET = 14, 2, 2
QWEN_IMAGE_GRID = (32, 32)  # patches of one 448x448 image: 256 visual tokens after the 2x2 merge
QWEN_FRAME_GRID = (16, 16)  # patches of one 224x224 frame: 64 visual tokens per 2-frame tubelet


def qwen2_5_vl_config(width: int, layers: int, vocab: int = 1000):
    """Qwen2.5-VL-7B's decoder shape at a reduced width, with a small vision tower (random weights).

    Head dim 128 (``width`` if smaller), ``width / 128`` query heads and 4/28 as many KV heads
    (at least one): the 7B's grouped-query attention scaled down (7:1 becomes 8:1 at width 1024).
    The MLP keeps the 7B's 18944/3584 ratio and the M-RoPE sections its 16/24/24 split of half a
    head. The tower keeps the real patch (14 px), 2x2 merge, 2-frame tubelets and window
    attention with one full-attention block, but is 4 blocks of width 64: it runs inside every
    prefill (its time is part of what is measured) without being what is measured.

    Example:
        >>> cfg = qwen2_5_vl_config(1024, 16)
        >>> t = cfg.text_config
        >>> t.num_attention_heads, t.num_key_value_heads, t.head_dim, t.intermediate_size
        (8, 1, 128, 5412)
    """
    from transformers import Qwen2_5_VLConfig

    head_dim = min(128, width)
    heads = width // head_dim
    rope = {
        "rope_type": "default",
        "rope_theta": 1000000.0,
        "mrope_section": [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16],
    }
    text = dict(
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=int(width * 18944 / 3584),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, round(heads * 4 / 28)),
        head_dim=head_dim,
        max_position_embeddings=32768,
        rope_parameters=rope,
        bos_token_id=1,  # the real ids lie outside the small vocabulary
        eos_token_id=2,
    )
    vision = dict(
        depth=4,
        hidden_size=64,
        intermediate_size=128,
        num_heads=2,
        out_hidden_size=width,
        patch_size=QWEN_PATCH,
        spatial_merge_size=QWEN_MERGE,
        temporal_patch_size=QWEN_TUBELET,
        window_size=112,
        fullatt_block_indexes=[3],
        tokens_per_second=2,
    )
    return Qwen2_5_VLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=QWEN_IMAGE,
        video_token_id=QWEN_VIDEO,
        vision_start_token_id=QWEN_VSTART,
        vision_end_token_id=QWEN_VEND,
    )


def build_qwen_model(width: int, layers: int, seed: int = 0):
    """A ``Qwen2_5_VLForConditionalGeneration`` of :func:`qwen2_5_vl_config` (random weights, SDPA)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(qwen2_5_vl_config(width, layers)).eval()
    model.set_attn_implementation("sdpa")
    return model


def build_qwen_inputs(batch: int, media: str, frames: int = 16, text_tokens: int = 64, seed: int = 0) -> dict:
    """Processor-like kwargs for ``batch`` rows of one 448x448 image (``media="image"``, 256 tokens)
    or one clip of ``frames`` 224x224 frames (``"video"``, 64 tokens per 2-frame tubelet): the
    visual tokens between vision start / end tokens after 5 text tokens, ``text_tokens`` text tokens
    in all, ``mm_token_type_ids`` 1 for image and 2 for video tokens, and for a clip the
    ``second_per_grid_ts`` the processor gives at its default 2 fps (1 s per tubelet)."""
    if media not in ("image", "video"):
        raise ValueError(f"--media must be 'image' or 'video', got {media!r}")
    if media == "video" and (frames < QWEN_TUBELET or frames % QWEN_TUBELET):
        raise ValueError(
            f"--frames must be a positive multiple of {QWEN_TUBELET} (2-frame tubelets), got {frames}"
        )
    gen = torch.Generator().manual_seed(seed)
    h, w = QWEN_IMAGE_GRID if media == "image" else QWEN_FRAME_GRID
    t = 1 if media == "image" else frames // QWEN_TUBELET
    n_visual = t * h * w // QWEN_MERGE**2
    token = QWEN_IMAGE if media == "image" else QWEN_VIDEO
    pre = torch.randint(3, 900, (batch, 5), generator=gen)
    post = torch.randint(3, 900, (batch, text_tokens - 7), generator=gen)
    ids = torch.cat(
        [
            pre,
            torch.full((batch, 1), QWEN_VSTART),
            torch.full((batch, n_visual), token),
            torch.full((batch, 1), QWEN_VEND),
            post,
        ],
        1,
    )
    patch_dim = 3 * QWEN_TUBELET * QWEN_PATCH**2
    pixels = torch.randn(batch * t * h * w, patch_dim, generator=gen)
    grid = torch.tensor([[t, h, w]] * batch)
    kw = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    kw["mm_token_type_ids"] = ((ids == QWEN_IMAGE).int() + 2 * (ids == QWEN_VIDEO).int()).int()
    if media == "image":
        kw.update(pixel_values=pixels, image_grid_thw=grid)
    else:
        kw.update(pixel_values_videos=pixels, video_grid_thw=grid, second_per_grid_ts=torch.ones(batch))
    return kw


def build_inputs(batch: int, text_tokens: int = 64, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    pre = torch.randint(3, 900, (batch, 5), generator=gen)
    post = torch.randint(3, 900, (batch, text_tokens - 5), generator=gen)
    ids = torch.cat([pre, torch.full((batch, 576), 999), post], 1)
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": torch.randn(batch, 3, 336, 336, generator=gen),
    }


def _prefill(model, kw):
    with torch.inference_mode():
        return model(**kw, logits_to_keep=1, use_cache=True)


def measure(
    model, kw, plans: list[str], repeats: int, warmup: int, baseline_every: int = 4, saved=None, save=None
) -> dict:
    """Interleaved, paired timing of every plan (:func:`time_plans`); FLOPs and token counts of each.

    ``saved`` is this batch's checkpoint (a dict, filled in as the run goes: ``"counts"`` once the
    FLOPs are counted, ``"timing"`` after each repeat) and ``save()`` writes it out; a ``saved``
    that already holds counts and repeats (from ``--resume``) is continued, not redone.
    """
    saved = {} if saved is None else saved
    save = save or (lambda: None)
    counts = saved.get("counts") or _count(model, kw, plans)
    saved["counts"] = counts
    save()

    def on_repeat(timing: dict, done: int) -> None:
        saved["timing"] = {"repeats_done": done, "results": timing}
        save()

    timing = saved.get("timing")
    done = (timing["results"], timing["repeats_done"]) if timing else None
    results = time_plans(model, kw, plans, repeats, warmup, baseline_every, done=done, on_repeat=on_repeat)
    base_f = counts["baseline"]["counted_flops"] + counts["baseline"]["attention_flops"]
    for p in plans:
        r = results[p]
        r.update(counts[p])
        r["flops_speedup"] = base_f / (r["counted_flops"] + r["attention_flops"])
        r["share_of_allowed"] = r["measured_speedup"] / r["flops_speedup"]
    return results


def _count(model, kw, plans: list[str]) -> dict:
    """Counted matmul FLOPs, causal attention FLOPs by formula and visual tokens per layer of each plan."""
    counts = {}
    n_visual = _visual_tokens(model, kw)
    for p in plans:
        _apply(model, p)
        flops, _ = count_flops(_prefill, model, kw)
        st = vtprune.stats(model) if p != "baseline" else None
        n_text = kw["input_ids"].shape[1] - n_visual
        per_layer = (
            st.visual_tokens_per_layer
            if st
            else [float(n_visual)] * model.config.text_config.num_hidden_layers
        )
        attn = attention_flops(model.config.text_config, [n + n_text for n in per_layer]) / 2  # causal half
        counts[p] = dict(
            counted_flops=flops,
            attention_flops=attn * kw["input_ids"].shape[0],
            visual_tokens_per_layer=per_layer,
        )
    return counts


def _visual_tokens(model, kw) -> int:
    """Image and video placeholder tokens in the first row (every row has the same count here):
    576 on the LLaVA model, 256 or ``8 * 64`` on the Qwen2.5-VL one."""
    ids = kw["input_ids"][0]
    marks = [getattr(model.config, k, None) for k in ("image_token_id", "video_token_id")]
    return int(sum((ids == m).sum() for m in marks if m is not None))


def time_plans(
    model,
    kw,
    plans: list[str],
    repeats: int,
    warmup: int,
    baseline_every: int = 4,
    run=None,
    done=None,
    on_repeat=None,
    timed: bool = False,
) -> dict:
    """Prefill time of each plan (``"baseline"`` among them) on inputs ``kw``: warmed up, interleaved, paired.

    A shared CPU drifts in speed by tens of percent over a minute, more than the effects being
    measured, so each plan's speedup is paired: within a repeat the baseline is re-timed before
    and after every ``baseline_every`` plans, and a plan's speedup in that repeat is the mean of
    its two bracketing baseline times over its own time. The reported speedup
    (``measured_speedup``) is the median of these paired ratios over the repeats; ``median_s``
    is the plain median of the plan's own times. ``warmup`` untimed runs of each plan come first.
    ``run(model, kw)`` is what is timed: the prefill by default (the tower benchmark times the
    image encoder alone); with ``timed``, ``run`` returns the seconds to record itself (the
    prefixkv benchmark times the decode steps of a ``generate``, not its prefill).
    ``done = (lists, n)`` continues a checkpoint: ``lists`` holds each plan's ``times`` /
    ``overheads`` / ``paired_speedups`` after ``n`` repeats, and only the remaining
    ``repeats - n`` are timed; ``on_repeat(lists, n)`` is called after every repeat.
    """
    run = run or _prefill
    if "baseline" not in plans:
        raise ValueError(f"time_plans needs 'baseline' among the plans to pair with, got {plans}")
    keys = ("times", "overheads", "paired_speedups")
    results = {p: {k: [] for k in keys} for p in plans}
    first = 0
    if done is not None:
        lists, first = done
        if set(lists) != set(plans):
            raise ValueError(f"the checkpoint times plans {sorted(lists)}, this run {sorted(plans)}")
        results = {p: {k: list(lists[p][k]) for k in keys} for p in plans}
    others = [p for p in plans if p != "baseline"]
    for p in plans if first < repeats else []:
        _apply(model, p)
        for _ in range(warmup):
            run(model, kw)
    for n in tqdm(range(first, repeats), desc=f"batch {kw['input_ids'].shape[0]}", leave=False):
        before = _time_plan(model, kw, "baseline", results, run, timed)
        for start in range(0, len(others), baseline_every):
            chunk = others[start : start + baseline_every]
            times = {p: _time_plan(model, kw, p, results, run, timed) for p in chunk}
            after = _time_plan(model, kw, "baseline", results, run, timed)
            for p, t in times.items():
                results[p]["paired_speedups"].append((before + after) / 2 / t)
            before = after
        if on_repeat is not None:
            on_repeat({p: {k: list(results[p][k]) for k in keys} for p in plans}, n + 1)
    vtprune.remove(model)
    for p in plans:
        r = results[p]
        r["median_s"] = statistics.median(r["times"])
        r["measured_speedup"] = statistics.median(r["paired_speedups"]) if r["paired_speedups"] else 1.0
        r["overhead_share"] = statistics.median(r["overheads"]) / r["median_s"] if r["overheads"] else 0.0
    return results


def _apply(model, plan: str) -> None:
    """Put ``plan`` in force with its overhead measured (``stats(model).overhead_s``)."""
    apply_plan(model, plan, timing=True)


def _time_plan(model, kw, plan: str, results: dict, run=None, timed: bool = False) -> float:
    """Apply ``plan``, time one ``run`` (a prefill by default; ``timed``: the seconds it returns),
    and record its time (and the method overhead, which only a prefill records)."""
    _apply(model, plan)
    t0 = time.perf_counter()
    out = (run or _prefill)(model, kw)
    elapsed = float(out) if timed else time.perf_counter() - t0
    results[plan]["times"].append(elapsed)
    st = vtprune.stats(model) if plan != "baseline" else None
    if st is not None and st.overhead_s is not None:
        results[plan]["overheads"].append(st.overhead_s)
    return elapsed


def markdown(report: dict) -> str:
    model = (
        _qwen_model_line(report)
        if report.get("arch") == "qwen2_5_vl"
        else f"Model: LLaVA-1.5 geometry (576 visual tokens, {report['layers']} layers), width {report['width']}, "
        + _tower_note(report)
    )
    lines = [
        f"# Prefill benchmark ({report['machine']})",
        "",
        f"{model}"
        f"random weights; threads={report['threads']}, OMP_WAIT_POLICY={report['omp_wait_policy']}; "
        f"{report['repeats']} interleaved repeats after {report['warmup']} warm-up runs; the baseline is "
        f"re-timed around every {report['baseline_every']} plans.",
        "",
        "| batch | plan | visual tokens / layer (mean) | median prefill (s) | measured speedup | FLOPs-allowed speedup | share of allowed | method overhead |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for batch, res in report["results"].items():
        for plan, r in res.items():
            eq = sum(r["visual_tokens_per_layer"]) / len(r["visual_tokens_per_layer"])
            lines.append(
                f"| {batch} | `{plan}` | {eq:.0f} | {r['median_s']:.3f} | {r['measured_speedup']:.2f}x | "
                f"{r['flops_speedup']:.2f}x | {100 * r['share_of_allowed']:.1f}% | {100 * r['overhead_share']:.2f}% |"
            )
    lines += [
        "",
        "Measured speedup = median over the repeats of (mean of the two baseline runs timed just before "
        "and after the plan's group) / (the plan's run): paired, because this machine's speed drifts "
        "between runs more than the differences measured. Median prefill is the plain median of the plan's runs.",
        "",
        "FLOPs-allowed speedup = (counted matmul FLOPs + causal attention FLOPs by formula) of the unpruned "
        "prefill / the same for the plan; `torch.utils.flop_counter` does not count CPU SDPA kernels, hence the formula.",
    ]
    if report.get("arch") == "qwen2_5_vl":
        lines += [
            "",
            f"The vision tower runs in every prefill, pruned or not: alone it takes {report['tower_s']:.3f} s "
            f"(median of {report['repeats']}, batch {min(report['results'])}), part of every prefill time above; "
            "its matmuls are in the counted FLOPs, its attention is not (the same for every plan). The decoder's "
            "grouped-query attention is counted with its query heads: KV heads change only the k/v projections, "
            "which the counter measures.",
        ]
    return "\n".join(lines) + "\n"


def _tower_note(report: dict) -> str:
    """The tower depth, named only when it is not the default 2 (older tables did not record it)."""
    depth = report.get("tower_layers", 2)
    return "" if depth == 2 else f"a {depth}-layer width-64 CLIP tower, "


def _qwen_model_line(report: dict) -> str:
    media = (
        "one 448x448 image (32x32 patches, 256 visual tokens)"
        if report["media"] == "image"
        else f"a {report['frames']}-frame clip of 224x224 frames (64 visual tokens per 2-frame tubelet, "
        f"{report['frames'] // QWEN_TUBELET * 64} in all)"
    )
    t = report["text_config"]
    return (
        f"Model: Qwen2.5-VL-7B decoder shape (`Qwen2_5_VLForConditionalGeneration`) at width {report['width']}, "
        f"{report['layers']} layers, {t['heads']} query / {t['kv_heads']} KV heads of dim {t['head_dim']}, "
        f"MLP {t['intermediate']}; a 4-block, width-64 vision tower; input {media} and 64 text tokens; "
    )


def _time_tower(model, kw, repeats: int) -> float:
    """Median time of the vision tower alone on the inputs' pixels (it is part of every prefill)."""
    visual = model.model.visual
    if "pixel_values" in kw:
        pixels, grid = kw["pixel_values"], kw["image_grid_thw"]
    else:
        pixels, grid = kw["pixel_values_videos"], kw["video_grid_thw"]
    times = []
    with torch.inference_mode():
        visual(pixels, grid_thw=grid)  # warm-up
        for _ in range(repeats):
            t0 = time.perf_counter()
            visual(pixels, grid_thw=grid)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--plans",
        default=";".join(DEFAULT_PLANS),
        help="plans separated by ';' (e.g. 'baseline;fastv:layer=2,keep=0.25')",
    )
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument(
        "--baseline-every", type=int, default=4, help="re-time the baseline after this many plans"
    )
    ap.add_argument("--out", default=None, help="folder for prefill_bench.json / .md")
    ap.add_argument("--quick", action="store_true", help="tiny width, 2 repeats: a smoke run")
    ap.add_argument(
        "--arch",
        choices=("llava", "qwen2_5_vl"),
        default="llava",
        help="llava: LLaVA-1.5 geometry; qwen2_5_vl: Qwen2.5-VL-7B decoder shape with a small tower",
    )
    ap.add_argument(
        "--media", choices=("image", "video"), default="image", help="qwen2_5_vl only: one image or one clip"
    )
    ap.add_argument("--frames", type=int, default=16, help="qwen2_5_vl video: frames in the clip (even)")
    ap.add_argument(
        "--tower-layers",
        type=int,
        default=2,
        help="llava: depth of the width-64 CLIP tower (default 2; 24 = CLIP-L's depth, for methods "
        "that read two tower layers such as vscan)",
    )
    ap.add_argument(
        "--resume",
        action="store_true",
        help="continue from <out>/prefill_bench.partial.json (written as a run goes)",
    )
    args = ap.parse_args(argv)
    for name in ("repeats", "baseline_every", "tower_layers"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.arch == "llava" and (args.media != "image" or "--frames" in (argv or [])):
        ap.error(f"--media {args.media} / --frames need --arch qwen2_5_vl (the LLaVA model takes one image)")
    if args.arch != "llava" and args.tower_layers != 2:
        ap.error(f"--tower-layers {args.tower_layers} needs --arch llava (the Qwen2.5-VL tower is fixed)")
    if args.resume and not args.out:
        ap.error("--resume needs --out (the checkpoint is <out>/prefill_bench.partial.json)")
    if args.frames < QWEN_TUBELET or args.frames % QWEN_TUBELET:
        ap.error(
            f"--frames must be a positive multiple of {QWEN_TUBELET} (2-frame tubelets), got {args.frames}"
        )
    if args.quick:
        args.width, args.repeats, args.warmup, args.batches = 64, 2, 1, "1"
    plans = [p for p in args.plans.split(";") if p]
    if "baseline" not in plans:
        plans.insert(0, "baseline")
    if args.arch == "qwen2_5_vl":
        model = build_qwen_model(args.width, args.layers)

        def inputs(b):
            return build_qwen_inputs(b, args.media, args.frames)
    else:
        model = build_model(args.width, args.layers, tower_layers=args.tower_layers)
        inputs = build_inputs
    report = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}",
        "width": args.width,
        "layers": args.layers,
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
        "repeats": args.repeats,
        "warmup": args.warmup,
        "baseline_every": args.baseline_every,
        "results": {},
    }
    if args.arch == "llava":
        report["tower_layers"] = args.tower_layers
    if args.arch == "qwen2_5_vl":
        t = model.config.text_config
        report.update(
            arch=args.arch,
            media=args.media,
            frames=args.frames if args.media == "video" else 1,
            text_config=dict(
                heads=t.num_attention_heads,
                kv_heads=t.num_key_value_heads,
                head_dim=t.head_dim,
                intermediate=t.intermediate_size,
            ),
        )
    batches = [int(x) for x in args.batches.split(",")]
    checkpoint = Checkpoint(args.out, _settings(report, plans, batches), args.resume)
    for b in batches:
        report["results"][b] = measure(
            model,
            inputs(b),
            plans,
            args.repeats,
            args.warmup,
            args.baseline_every,
            saved=checkpoint.batch(b),
            save=checkpoint.save,
        )
    if args.arch == "qwen2_5_vl":
        report["tower_s"] = _time_tower(model, inputs(min(batches)), args.repeats)
    for res in report["results"].values():
        for r in res.values():
            r.pop("overheads")
            r["paired_speedups"] = [round(x, 4) for x in r["paired_speedups"]]
    md = markdown(report)
    publish_benchmark(report, md, args.out, "prefill_bench")
    checkpoint.finish()
    return report


def _settings(report: dict, plans: list[str], batches: list[int]) -> dict:
    """What a checkpoint must share with the run that resumes it (everything but ``repeats``)."""
    same = ("width", "layers", "warmup", "baseline_every", "arch", "media", "frames", "tower_layers")
    return {"plans": plans, "batches": batches, **{k: report[k] for k in same if k in report}}


class Checkpoint:
    """``<out>/prefill_bench.partial.json``: the FLOPs counts and finished repeats of each batch.

    Written after every repeat (to a temporary file, then renamed, so a kill mid-write leaves the
    previous one); ``resume`` reads it back and refuses one written with other settings. Without
    ``out`` nothing is written.

    Example:
        >>> import tempfile
        >>> d = tempfile.mkdtemp()
        >>> c = Checkpoint(d, {"width": 64}, resume=False)
        >>> c.batch(4)["counts"] = {"baseline": {}}
        >>> c.save()
        >>> sorted(Checkpoint(d, {"width": 64}, resume=True).batch(4))
        ['counts']
        >>> Checkpoint(d, {"width": 128}, resume=True)
        Traceback (most recent call last):
        ...
        ValueError: --resume: the checkpoint ... was written with width=64, this run has width=128
    """

    def __init__(self, out, settings: dict, resume: bool):
        self.path = Path(out) / "prefill_bench.partial.json" if out else None
        self.state = {"settings": settings, "batches": {}}
        if resume:
            if not self.path.exists():
                raise ValueError(f"--resume: no checkpoint at {self.path}")
            saved = json.loads(self.path.read_text())
            for k in sorted(set(settings) | set(saved["settings"])):
                old, new = saved["settings"].get(k), settings.get(k)
                if old != new:
                    raise ValueError(
                        f"--resume: the checkpoint {self.path} was written with {k}={old}, this run has {k}={new}"
                    )
            self.state = saved

    def batch(self, b: int) -> dict:
        """This batch's slot (JSON keys are strings, hence ``str(b)``)."""
        return self.state["batches"].setdefault(str(b), {})

    def save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state))
        tmp.replace(self.path)

    def finish(self) -> None:
        """The table is written: the checkpoint is no longer needed."""
        if self.path is not None and self.path.exists():
            self.path.unlink()


if __name__ == "__main__":
    main()
