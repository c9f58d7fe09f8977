"""``vtprune eval``: accuracy and efficiency of the unpruned model and any number of plans.

Run as ``vtprune eval ...`` (once wired into :mod:`vtprune.cli`), ``python -m vtprune.eval.harness.cli_eval
...``, or sharded over processes with ``accelerate launch --num_processes 2 -m
vtprune.eval.harness.cli_eval ...``. Results go to ``OUT/results.json``, per-sample records to
``OUT/<task>/<plan>.jsonl.gz``, and the report to ``OUT/report.md`` + ``OUT/plots/*.png``.

Several processes on a machine without GPUs: ``accelerate launch --cpu --num_processes 2``
starts only ONE process in accelerate 1.x unless an MPI hostfile is given; use
``CUDA_VISIBLE_DEVICES= accelerate launch --multi_gpu --num_processes 2 -m vtprune.eval.harness.cli_eval
...`` or ``torchrun --nproc_per_node 2 -m vtprune.eval.harness.cli_eval ...`` (the runner then joins the
ranks in a CPU ``gloo`` group).

Example::

    vtprune eval --model llava-hf/llava-1.5-7b-hf --tasks pope,mme --data-dir data \\
        --plans baseline,pdrop:keep=0.25,fastv:layer=2,keep=0.25 --output results/eval --limit 200
"""

from __future__ import annotations

import argparse
import sys


def _split(text: str) -> list[str]:
    # tasks follow the plans' rule: a comma followed by a bare name (no "=") starts a new item
    from vtprune.cli import _split_plans

    return [t for t in _split_plans(text) if t]


def configure_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``eval`` options to ``p`` (shared by the subcommand and the module entry point).

    Example:
        >>> args = configure_parser(argparse.ArgumentParser()).parse_args(
        ...     ["--model", "llava", "--tasks", "synthvqa", "--output", "out"])
        >>> args.plans, args.batch_size
        ('baseline', 8)
    """
    p.add_argument("--model", required=True, help="folder, hub id, or shipped tiny model (llava, qwen2_vl)")
    p.add_argument(
        "--tasks",
        required=True,
        help="comma-separated: pope,mme,gqa,textvqa,scienceqa,mmbench,seedbench,synthvqa; "
        "options after a colon, e.g. pope:parser=lenient,splits=random",
    )
    p.add_argument(
        "--data-dir", default=None, help="folder with one sub-folder per benchmark (synthvqa needs none)"
    )
    p.add_argument(
        "--plans", default="baseline", help="e.g. baseline,pdrop:keep=0.25,fastv:layer=2,keep=0.25"
    )
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--limit", type=int, default=None, help="first N items of each task")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--device", default="auto", help="auto (the accelerate rank's device), cpu, cuda:0, ...")
    p.add_argument("--dtype", default="auto", help="auto (bfloat16 on CUDA, float32 on CPU), float16, ...")
    p.add_argument("--no-resume", action="store_true", help="discard earlier records instead of resuming")
    p.add_argument("--no-meters", action="store_true", help="skip the efficiency meters")
    p.add_argument("--meter-repeats", type=int, default=5, help="timed repeats per plan (median reported)")
    p.add_argument("--decode-tokens", type=int, default=8, help="tokens generated to time decoding")
    p.add_argument("--no-report", action="store_true", help="skip report.md and the plots")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def run_from_args(args: argparse.Namespace) -> dict | None:
    """Run the evaluation (and the report on the main process) for parsed ``eval`` arguments."""
    from vtprune.eval.harness.runner import run_eval

    results = run_eval(
        args.model,
        _split(args.tasks),
        args.data_dir,
        _split(args.plans),
        args.output,
        limit=args.limit,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        resume=not args.no_resume,
        device=args.device,
        dtype=args.dtype,
        meters=not args.no_meters,
        meter_repeats=args.meter_repeats,
        decode_tokens=args.decode_tokens,
        progress=not args.quiet,
    )
    if results is not None and not args.no_report:
        from vtprune.eval.harness.reports import write_report

        paths = write_report(results, args.output)
        print(f"vtprune eval: results in {args.output}/results.json, report in {paths['markdown']}")
    return results


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``eval`` subcommand to the ``vtprune`` command's subparsers.

    Example:
        >>> ap = argparse.ArgumentParser(prog="vtprune")
        >>> _ = add_eval_parser(ap.add_subparsers(dest="command"))
        >>> ap.parse_args(["eval", "--model", "m", "--tasks", "pope", "--output", "o"]).fn.__name__
        'run_from_args'
    """
    p = subparsers.add_parser(
        "eval", help="accuracy, FLOPs, latency and memory of plans vs the unpruned model"
    )
    configure_parser(p)
    p.set_defaults(fn=run_from_args)
    return p


def main(argv=None) -> dict | None:
    """``python -m vtprune.eval.harness.cli_eval --model ... --tasks ... --output ...``."""
    parser = configure_parser(
        argparse.ArgumentParser(prog="vtprune eval", description=__doc__.splitlines()[0])
    )
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
