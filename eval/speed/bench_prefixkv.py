"""PrefixKV benchmark: KV-cache bytes saved and decode tokens/s at global budgets 20-50%.

Runs the decode benchmark's meters (``bench_decode``: the LLaVA-1.5-shaped model of the prefill
benchmark, random weights, reduced width, batch 1, 576 visual + 24 text tokens) on the unpruned
model and ``prefixkv`` at each budget (per-request budgets: no profile is needed for speed,
the cache lengths are the same on average).

Run: ``python -m vtprune.eval.speed.bench_prefixkv --out results/prefixkv``.

Example:
    >>> plans([0.2, 0.5])
    ['baseline', 'prefixkv:keep=0.2', 'prefixkv:keep=0.5']
"""

from __future__ import annotations

import argparse

from vtprune.eval.speed import bench_decode

BUDGETS = (0.2, 0.3, 0.4, 0.5)


def plans(budgets) -> list[str]:
    return ["baseline"] + [f"prefixkv:keep={b}" for b in budgets]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", default=",".join(map(str, BUDGETS)))
    ap.add_argument("--width", default="512")
    ap.add_argument("--layers", default="32")
    ap.add_argument("--tokens", default="32")
    ap.add_argument("--repeats", default="3")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    budgets = [float(b) for b in args.budgets.split(",") if b]
    forward = ["--plans", ";".join(plans(budgets))]
    for name in ("width", "layers", "tokens", "repeats"):
        forward += [f"--{name}", getattr(args, name)]
    if args.out:
        forward += ["--out", args.out]
    return bench_decode.main(forward)


if __name__ == "__main__":
    main()
