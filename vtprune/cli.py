"""The ``vtprune`` command: ``demo``, ``eval``, ``bench``, ``flops``."""

from __future__ import annotations

import argparse
import sys


def _demo(args) -> None:
    from vtprune.demo import run_demo

    run_demo(
        arch=args.model,
        keep=args.keep,
        methods=args.methods.split(",") if args.methods else None,
        n=args.n,
        repeats=args.repeats,
    )


def _flops(args) -> None:
    from vtprune.eval.speed.flops_report import flops_report, format_flops_table

    print(
        format_flops_table(
            flops_report(args.model, args.plans.split(";") if ";" in args.plans else _split_plans(args.plans))
        )
    )


def _split_plans(text: str) -> list[str]:
    """Split ``"baseline,pdrop:layers=8+16+24,ratio=0.5"`` into plans: a comma followed by a name starts one.

    Example:
        >>> _split_plans("baseline,pdrop:layers=8+16+24,ratio=0.5,fastv:keep=0.5")
        ['baseline', 'pdrop:layers=8+16+24,ratio=0.5', 'fastv:keep=0.5']
    """
    plans: list[str] = []
    for piece in text.split(","):
        if plans and ("=" in piece and ":" not in piece):
            plans[-1] += "," + piece
        else:
            plans.append(piece)
    return plans


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # the benchmark has its own option parser: hand it everything
        from vtprune.eval.speed.bench_prefill import main as bench_main

        bench_main(argv[1:])
        return
    ap = argparse.ArgumentParser(prog="vtprune", description="Visual token pruning for Hugging Face VLMs")
    sub = ap.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="compare methods on the shipped tiny model (no download)")
    d.add_argument(
        "--model",
        default="llava",
        choices=("llava", "qwen2_vl", "llava_noattn", "qwen2_vl_video"),
        help="a shipped tiny model (llava_noattn: the tiny LLaVA trained without the answer-attention "
        "loss; qwen2_vl_video: the tiny Qwen2-VL on 8-frame clips, asked about clips; for a folder or "
        "hub id use vtprune eval --model)",
    )
    d.add_argument("--keep", type=float, default=0.5)
    d.add_argument("--methods", default=None, help="comma-separated (default: every method)")
    d.add_argument("--n", type=int, default=32, help="held-out questions for the accuracy column")
    d.add_argument("--repeats", type=int, default=5, help="timed prefill rounds (median reported)")
    d.set_defaults(fn=_demo)
    from vtprune.eval.harness.cli_eval import add_eval_parser

    add_eval_parser(sub)
    sub.add_parser("bench", help="prefill benchmark (options: vtprune bench -h)")
    f = sub.add_parser("flops", help="FLOPs of a model config on the meta device, no weights")
    f.add_argument("model", help="shipped config name (e.g. llava-1.5-7b), local folder or hub id")
    f.add_argument("--plans", default="baseline", help="e.g. baseline,pdrop:layers=8+16+24,ratio=0.5")
    f.set_defaults(fn=_flops)
    args = ap.parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    main()
