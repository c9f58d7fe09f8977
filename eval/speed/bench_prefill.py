"""Prefill benchmark: measured speedup of each plan next to the speedup its FLOPs allow.

A LLaVA-1.5-shaped model (576 visual tokens, 32 decoder layers, reduced width so it runs on
a CPU, random weights) runs prefill (``logits_to_keep=1``, as ``generate`` does) unpruned and
under each plan, batch 1 and 4. Runs are interleaved in one process, warmed up, and the median
of the repeats is reported with the thread settings, because CPU timings on small machines are
only meaningful that way (see EVAL.md).

Run: ``python -m vtprune.eval.speed.bench_prefill --out results/prefill`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

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


def build_model(width: int, layers: int, seed: int = 0):
    """LLaVA-1.5 token geometry at a reduced width (random weights)."""
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(llava_config(width, layers)).eval()
    model.set_attn_implementation("sdpa")
    return model


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


def measure(model, kw, plans: list[str], repeats: int, warmup: int, baseline_every: int = 4) -> dict:
    """Interleaved, paired timing of every plan (:func:`time_plans`); FLOPs and token counts of each."""
    counts = {}
    for p in plans:
        _apply(model, p)
        flops, _ = count_flops(_prefill, model, kw)
        st = vtprune.stats(model) if p != "baseline" else None
        n_text = kw["input_ids"].shape[1] - 576
        per_layer = st.visual_tokens_per_layer if st else [576.0] * model.config.text_config.num_hidden_layers
        attn = attention_flops(model.config.text_config, [n + n_text for n in per_layer]) / 2  # causal half
        counts[p] = dict(
            counted_flops=flops,
            attention_flops=attn * kw["input_ids"].shape[0],
            visual_tokens_per_layer=per_layer,
        )
    results = time_plans(model, kw, plans, repeats, warmup, baseline_every)
    base_f = counts["baseline"]["counted_flops"] + counts["baseline"]["attention_flops"]
    for p in plans:
        r = results[p]
        r.update(counts[p])
        r["flops_speedup"] = base_f / (r["counted_flops"] + r["attention_flops"])
        r["share_of_allowed"] = r["measured_speedup"] / r["flops_speedup"]
    return results


def time_plans(model, kw, plans: list[str], repeats: int, warmup: int, baseline_every: int = 4) -> dict:
    """Prefill time of each plan (``"baseline"`` among them) on inputs ``kw``: warmed up, interleaved, paired.

    A shared CPU drifts in speed by tens of percent over a minute, more than the effects being
    measured, so each plan's speedup is paired: within a repeat the baseline is re-timed before
    and after every ``baseline_every`` plans, and a plan's speedup in that repeat is the mean of
    its two bracketing baseline times over its own time. The reported speedup
    (``measured_speedup``) is the median of these paired ratios over the repeats; ``median_s``
    is the plain median of the plan's own times. ``warmup`` untimed runs of each plan come first.
    """
    if "baseline" not in plans:
        raise ValueError(f"time_plans needs 'baseline' among the plans to pair with, got {plans}")
    results = {p: {"times": [], "overheads": [], "paired_speedups": []} for p in plans}
    others = [p for p in plans if p != "baseline"]
    for p in plans:
        _apply(model, p)
        for _ in range(warmup):
            _prefill(model, kw)
    for _ in tqdm(range(repeats), desc=f"batch {kw['input_ids'].shape[0]}", leave=False):
        before = _time_plan(model, kw, "baseline", results)
        for start in range(0, len(others), baseline_every):
            chunk = others[start : start + baseline_every]
            times = {p: _time_plan(model, kw, p, results) for p in chunk}
            after = _time_plan(model, kw, "baseline", results)
            for p, t in times.items():
                results[p]["paired_speedups"].append((before + after) / 2 / t)
            before = after
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


def _time_plan(model, kw, plan: str, results: dict) -> float:
    """Apply ``plan``, time one prefill, and record its time (and method overhead)."""
    _apply(model, plan)
    t0 = time.perf_counter()
    _prefill(model, kw)
    elapsed = time.perf_counter() - t0
    results[plan]["times"].append(elapsed)
    if plan != "baseline":
        results[plan]["overheads"].append(vtprune.stats(model).overhead_s)
    return elapsed


def markdown(report: dict) -> str:
    lines = [
        f"# Prefill benchmark ({report['machine']})",
        "",
        f"Model: LLaVA-1.5 geometry (576 visual tokens, {report['layers']} layers), width {report['width']}, "
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
    return "\n".join(lines) + "\n"


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
    args = ap.parse_args(argv)
    for name in ("repeats", "baseline_every"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.quick:
        args.width, args.repeats, args.warmup, args.batches = 64, 2, 1, "1"
    plans = [p for p in args.plans.split(";") if p]
    if "baseline" not in plans:
        plans.insert(0, "baseline")
    model = build_model(args.width, args.layers)
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
    for b in (int(x) for x in args.batches.split(",")):
        report["results"][b] = measure(
            model, build_inputs(b), plans, args.repeats, args.warmup, args.baseline_every
        )
    for res in report["results"].values():
        for r in res.values():
            r.pop("overheads")
            r["paired_speedups"] = [round(x, 4) for x in r["paired_speedups"]]
    md = markdown(report)
    publish_benchmark(report, md, args.out, "prefill_bench")
    return report


if __name__ == "__main__":
    main()
