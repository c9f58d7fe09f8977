"""Matmul throughput against sequence length: why fewer tokens cannot always buy proportional time.

A decoder layer's projections are matrix products ``(rows x width) @ (width x out)``. The weight
matrices are read from memory once per product whatever the number of rows, so at few rows
(a pruned sequence at batch 1) a CPU or GPU spends relatively more of each product streaming
weights and less multiplying, and delivers fewer FLOP/s. The prefill benchmark's "FLOPs-allowed
speedup" assumes the same FLOP/s at every length; this measures how far that holds on this
machine, for the projections of the prefill benchmark's model and the row counts its plans
produce (LLaVA-1.5 geometry: 576 visual + 64 text tokens per sample).

For each row count it reports GFLOP/s and the throughput relative to the unpruned row count:
the share of the FLOPs-allowed speedup that the matrix products alone can reach.

Run: ``python -m vtprune.eval.speed.bench_gemm --width 1536 --out results/gemm``.

Example:
    >>> rows_for(keep=0.25, batch=1)
    208
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from vtprune.eval.harness.reports import publish_benchmark

VISUAL, TEXT = 576, 64
KEEPS = (1.0, 0.5, 0.25, 0.11)


def rows_for(keep: float, batch: int) -> int:
    """Rows of every projection at prefill when ``keep`` of the 576 visual tokens remain."""
    return batch * (round(VISUAL * keep) + TEXT)


def layer_weights(width: int, intermediate: int, layers: int, seed: int = 0) -> list[list[torch.Tensor]]:
    """One set of LLaMA projection weights (q, k, v, o, gate, up, down) per layer.

    Distinct per layer, as in a model, so that no weight stays in cache from one layer to the next.
    """
    gen = torch.Generator().manual_seed(seed)
    shapes = [(width, width)] * 4 + [(intermediate, width)] * 2 + [(width, intermediate)]
    return [[torch.randn(s, generator=gen) for s in shapes] for _ in range(layers)]


def time_projections(weights, rows: int, repeats: int) -> float:
    """Median seconds for one pass of ``rows`` rows through every layer's projections."""
    width = weights[0][0].shape[1]
    x = torch.randn(rows, width)
    h = torch.randn(rows, weights[0][4].shape[0])
    times = []
    with torch.inference_mode():
        for _ in range(repeats):
            t0 = time.perf_counter()
            for layer in weights:
                for w in layer:
                    torch.nn.functional.linear(h if w.shape[1] != width else x, w)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(width: int, layers: int, batches: list[int], repeats: int) -> list[dict]:
    intermediate = width * 11008 // 4096
    weights = layer_weights(width, intermediate, layers)
    flops_per_row = 2 * sum(w.numel() for layer in weights for w in layer)
    time_projections(weights, rows_for(1.0, 1), 1)  # warm-up
    out = []
    for batch in batches:
        base = None
        for keep in KEEPS:
            rows = rows_for(keep, batch)
            t = time_projections(weights, rows, repeats)
            gflops = flops_per_row * rows / t / 1e9
            base = base or gflops
            out.append(
                {
                    "batch": batch,
                    "keep": keep,
                    "rows": rows,
                    "seconds": t,
                    "gflops": gflops,
                    "relative_throughput": gflops / base,
                }
            )
    return out


def markdown(report: dict) -> str:
    lines = [
        f"# Projection matmul throughput vs rows (width {report['width']}, {report['layers']} layers, "
        f"threads={report['threads']})",
        "",
        "| batch | keep | rows | median s | GFLOP/s | throughput vs unpruned |",
        "|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['batch']} | {r['keep']:.2f} | {r['rows']} | {r['seconds']:.3f} | {r['gflops']:.0f} | "
            f"{100 * r['relative_throughput']:.1f}% |"
        )
    lines += [
        "",
        "Throughput vs unpruned = GFLOP/s at this row count / GFLOP/s at the unpruned row count of the "
        "same batch: the most of the FLOPs-allowed speedup the projections (over 95% of the prefill's "
        "FLOPs at these sizes) can reach.",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=1536)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None, help="folder for gemm_bench.json / .md")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error(f"--repeats must be at least 1, got {args.repeats}")
    batches = [int(b) for b in args.batches.split(",")]
    report = {
        "width": args.width,
        "layers": args.layers,
        "threads": torch.get_num_threads(),
        "results": measure(args.width, args.layers, batches, args.repeats),
    }
    md = markdown(report)
    publish_benchmark(report, md, args.out, "gemm_bench")
    return report


if __name__ == "__main__":
    main()
