"""Decode benchmark: KV-cache bytes and decoding speed per plan (MustDrop's decode stage).

MustDrop re-indexes the KV caches of its earlier layers to the finally surviving tokens after
prefill; this measures what that saves while decoding on the LLaVA-1.5-shaped model of the
prefill benchmark (random weights, reduced width): KV-cache bytes and tokens/s, beside the
unpruned model and MustDrop without its decode stage.

Run: ``python -m vtprune.eval.speed.bench_decode --out results/decode``.
"""

from __future__ import annotations

import argparse

import torch

from vtprune.eval.harness.meters import measure_plans
from vtprune.eval.harness.reports import publish_benchmark
from vtprune.eval.speed.bench_prefill import build_inputs, build_model

DEFAULT_PLANS = [
    "baseline",
    "mustdrop:keep=0.25,decode=false",
    "mustdrop:keep=0.25",
    "fastv:keep=0.25",
    "pdrop:keep=0.25",
]


def markdown(results: dict, width: int, layers: int, tokens: int) -> str:
    base = results["baseline"]
    lines = [
        f"# Decode benchmark (LLaVA-1.5 geometry, width {width}, {layers} layers, {tokens} new tokens, batch 1)",
        "",
        "| plan | KV-cache MB | KV saved | decode ms/token | tokens/s | speedup |",
        "|---|---|---|---|---|---|",
    ]
    for plan, r in results.items():
        kv, ms = r["kv_cache_bytes"], r["decode_s_per_token"] * 1e3
        lines.append(
            f"| `{plan}` | {kv / 2**20:.2f} | {1 - kv / base['kv_cache_bytes']:.0%} | {ms:.2f} | {1e3 / ms:.1f} | "
            f"{base['decode_s_per_token'] * 1e3 / ms:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plans", default=";".join(DEFAULT_PLANS))
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    model = build_model(args.width, args.layers)
    plans = [p for p in args.plans.split(";") if p]
    with torch.inference_mode():
        results = measure_plans(
            model, build_inputs(1), plans, repeats=args.repeats, decode_tokens=args.tokens
        )
    md = markdown(results, args.width, args.layers, args.tokens)
    publish_benchmark(results, md, args.out, "decode_bench")
    return results


if __name__ == "__main__":
    main()
