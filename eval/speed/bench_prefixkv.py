"""PrefixKV benchmark: KV-cache bytes saved and decode tokens/s at global budgets 20-50%.

The decode benchmark's model (``bench_decode``: the LLaVA-1.5-shaped model of the prefill
benchmark, random weights, reduced width, batch 1, 576 visual + 64 text tokens) unpruned and
under ``prefixkv`` at each budget (per-request budgets: no profile is needed for speed, the cache
lengths are the same on average).

* KV-cache bytes, tokens and FLOPs: the harness meters (``measure_plans``, one timing repeat).
* Decode speed, paired as the prefill benchmark pairs prefills
  (:func:`vtprune.eval.speed.bench_prefill.time_plans`): one timed run is a ``generate`` of
  ``--tokens`` new tokens, and what is recorded is its mean decode step (the gaps between the
  steps' logits, so the prefill, unpruned under PrefixKV, is left out). Within a repeat the
  baseline is re-timed around every ``--baseline-every`` budgets; a budget's speedup is the mean
  of its two bracketing baseline steps over its own, median over the repeats. A shared CPU's
  drift between runs is larger than the effect measured, so unpaired medians mislead.

Run: ``python -m vtprune.eval.speed.bench_prefixkv --out results/prefixkv``.

Example:
    >>> plans([0.2, 0.5])
    ['baseline', 'prefixkv:keep=0.2', 'prefixkv:keep=0.5']
"""

from __future__ import annotations

import argparse
import os
import platform

import torch

from vtprune.eval.harness.meters import measure_plans
from vtprune.eval.harness.reports import publish_benchmark
from vtprune.eval.harness.timers import StepClock
from vtprune.eval.speed.bench_prefill import build_inputs, build_model, time_plans

BUDGETS = (0.2, 0.3, 0.4, 0.5)


def plans(budgets) -> list[str]:
    return ["baseline"] + [f"prefixkv:keep={b}" for b in budgets]


def decode_step(tokens: int):
    """``run(model, kw)`` for :func:`time_plans`: one greedy ``generate`` of ``tokens`` new tokens
    (exactly that many), returning its mean decode step in seconds."""
    from transformers import LogitsProcessorList

    def run(model, kw) -> float:
        clock = StepClock(next(model.parameters()).device)
        with torch.inference_mode():
            model.generate(
                **kw,
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                do_sample=False,
                use_cache=True,
                logits_processor=LogitsProcessorList([clock]),
            )
        return clock.per_token()

    return run


def measure(model, kw, budgets, repeats: int, warmup: int, tokens: int, baseline_every: int) -> dict:
    """Meters of every plan, then the paired decode timing (``decode_s_per_token`` is the median
    of the paired runs; the meters' own unpaired one is kept as ``unpaired_decode_s_per_token``)."""
    names = plans(budgets)
    with torch.inference_mode():
        meters = measure_plans(model, kw, names, repeats=1, warmup=0, decode_tokens=tokens)
    timing = time_plans(
        model, kw, names, repeats, warmup, baseline_every, run=decode_step(max(2, tokens)), timed=True
    )
    for plan in names:
        r, t = meters[plan], timing[plan]
        r["unpaired_decode_s_per_token"] = r.pop("decode_s_per_token")
        r.update(
            decode_s_per_token=t["median_s"],
            decode_steps_s=t["times"],
            decode_speedup=t["measured_speedup"],
            paired_speedups=[round(x, 4) for x in t["paired_speedups"]],
        )
    return meters


def markdown(report: dict) -> str:
    res = report["results"]
    base = res["baseline"]
    lines = [
        f"# PrefixKV decode benchmark ({report['machine']})",
        "",
        f"LLaVA-1.5 geometry (576 visual + 64 text tokens), width {report['width']}, {report['layers']} layers, "
        f"random weights, batch 1, {report['tokens']} new tokens a run; threads={report['threads']}, "
        f"OMP_WAIT_POLICY={report['omp_wait_policy']}; {report['repeats']} interleaved repeats after "
        f"{report['warmup']} warm-up runs; the baseline is re-timed around every {report['baseline_every']} budgets.",
        "",
        "| plan | KV-cache MB | KV saved | decode ms/token (median) | tokens/s | paired decode speedup | paired ratios (min-max) |",
        "|---|---|---|---|---|---|---|",
    ]
    for plan, r in res.items():
        kv, ms = r["kv_cache_bytes"], r["decode_s_per_token"] * 1e3
        ratios = r["paired_speedups"]
        span = f"{min(ratios):.2f}-{max(ratios):.2f}" if ratios else "-"
        lines.append(
            f"| `{plan}` | {kv / 2**20:.2f} | {1 - kv / base['kv_cache_bytes']:.0%} | {ms:.2f} | {1e3 / ms:.1f} "
            f"| {r['decode_speedup']:.2f}x | {span} |"
        )
    lines += [
        "",
        "Decode ms/token: the mean gap between a `generate` call's steps (prefill left out), median over "
        "the plan's runs. Paired decode speedup: median over the repeats of (mean of the two baseline runs "
        "just before and after the plan's group) / (the plan's run). KV-cache MB: what the cache holds "
        "after prefill, summed over layers.",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", default=",".join(map(str, BUDGETS)))
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=32, help="new tokens a timed run decodes (at least 2)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument(
        "--baseline-every", type=int, default=2, help="re-time the baseline after this many budgets"
    )
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    for name in ("repeats", "baseline_every", "width", "layers"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.tokens < 2:
        ap.error(f"--tokens must be at least 2 (a decode step is the gap between two), got {args.tokens}")
    budgets = [float(b) for b in args.budgets.split(",") if b]
    model = build_model(args.width, args.layers)
    report = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}",
        "width": args.width,
        "layers": args.layers,
        "tokens": args.tokens,
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
        "repeats": args.repeats,
        "warmup": args.warmup,
        "baseline_every": args.baseline_every,
        "results": measure(
            model, build_inputs(1), budgets, args.repeats, args.warmup, args.tokens, args.baseline_every
        ),
    }
    publish_benchmark(report, markdown(report), args.out, "decode_bench")
    return report


if __name__ == "__main__":
    main()
