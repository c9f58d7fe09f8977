"""Does ``vtprune.tune`` help? Default vs tuned settings at keep 11% on the shipped tiny models.

For each shipped tiny model and method: tune at ``keep`` on SynthVQA ``train`` items (the
calibration set, next-token KL at the answer position), then answer held-out ``test`` items
greedily with the unpruned model, the method's default settings and the tuned ones, and write
``README.md`` (accuracy and accuracy kept), ``results.json`` and the tuned plan files with their
trial logs (a rerun resumes them).

    python -m vtprune.eval.harness.tune_report --out results/tune --methods pdrop,mustdrop

Example:
    >>> calibration_items(2)[0]["id"]
    'synthvqa-train-0-0000000'
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import vtprune
from vtprune.config import config_from_name
from vtprune.eval.synthetic.synthvqa import build_prompt, generate_synthvqa, score_synthvqa
from vtprune.eval.synthetic.tiny_models import load_tiny

from .generation import encode, generate_answers
from .reports import write_keeping_notes

__all__ = ["calibration_items", "run"]

MODELS = {"llava": "tiny LLaVA-1.5 architecture", "qwen2_vl": "tiny Qwen2-VL architecture"}


def calibration_items(n: int, seed: int = 0) -> list[dict]:
    """The first ``n`` SynthVQA ``train`` items (never scored: the test split is held out)."""
    return generate_synthvqa(n, seed=seed, split="train")


def _batches(items, size):
    return [items[i : i + size] for i in range(0, len(items), size)]


def _answers(model, processor, arch, items, batch_size) -> list[str]:
    out = []
    for batch in _batches(items, batch_size):
        prompts = [build_prompt(it["question"], arch) for it in batch]
        out += generate_answers(model, processor, prompts, [it["image"] for it in batch], 3)
    return out


def _evaluate(model, processor, arch, items, plan, batch_size) -> dict:
    if plan is None:
        answers = _answers(model, processor, arch, items, batch_size)
        return {"accuracy": score_synthvqa(items, answers)["accuracy"], "keep": 1.0}
    keeps = []
    with vtprune.pruned(model, plan):
        answers = []
        for batch in _batches(items, batch_size):
            answers += _answers(model, processor, arch, batch, batch_size)
            keeps.append(vtprune.stats(model).keep_ratio)
    return {"accuracy": score_synthvqa(items, answers)["accuracy"], "keep": sum(keeps) / len(keeps)}


def run(
    out: str,
    methods=("pdrop",),
    models=tuple(MODELS),
    keep: float = 0.11,
    calibration: int = 32,
    test: int = 200,
    trials: int = 16,
    seed: int = 0,
    batch_size: int = 8,
    tolerance: float = 0.04,
) -> str:
    """Tune, evaluate and write ``out/README.md``; returns the README text."""
    folder = Path(out)
    results_path = folder / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    test_items = generate_synthvqa(test, seed=seed, split="test")
    cal_items = calibration_items(calibration, seed)
    for arch in models:
        model, processor = load_tiny(arch)
        device = next(model.parameters()).device
        samples = [
            encode(
                processor, [build_prompt(it["question"], arch) for it in b], [it["image"] for it in b], device
            )
            for b in _batches(cal_items, batch_size)
        ]
        base = results.get(f"{arch}/baseline") or _evaluate(
            model, processor, arch, test_items, None, batch_size
        )
        results[f"{arch}/baseline"] = base
        for method in methods:
            t0 = time.perf_counter()
            tuned = vtprune.tune(
                model,
                method,
                samples,
                keep=keep,
                trials=trials,
                seed=seed,
                out=folder / f"{arch}-{method}.json",
                tolerance=tolerance,
            )
            tune_s = time.perf_counter() - t0
            default = _evaluate(
                model, processor, arch, test_items, config_from_name(method, keep=keep), batch_size
            )
            best = _evaluate(model, processor, arch, test_items, tuned.config, batch_size)
            feasible = [t for t in tuned.trials if t["feasible"]]
            record = {
                "options": tuned.options,
                "kl_default": tuned.default_score,
                "kl_tuned": tuned.score,
                "trials": len(tuned.trials),
                "feasible": len(feasible),
                "tune_s": tune_s,
                "default": default,
                "tuned": best,
            }
            results[f"{arch}/{method}"] = record
            results_path.parent.mkdir(parents=True, exist_ok=True)
            results_path.write_text(json.dumps(results, indent=2) + "\n")
    rows = [_row(key, record, results) for key, record in results.items() if not key.endswith("/baseline")]
    unpruned = ", ".join(f"{a} {results[f'{a}/baseline']['accuracy']:.3f}" for a in models)
    text = (
        f"# `vtprune.tune` at keep {keep:.0%}: default vs tuned settings\n\n"
        f"Each method was tuned (`vtprune.tune`, objective `kl`: next-token KL divergence from the unpruned\n"
        f"model at the answer position) on the first {calibration} SynthVQA `train` items, {trials} trials\n"
        f"(trial 0 = the default settings), seed {seed}, settings whose measured keep is within {tolerance:.0%}\n"
        f"of the target (these small images round every schedule's counts); both settings then answered the first {test}\n"
        f"held-out `test` items greedily (3 new tokens). Unpruned accuracy: {unpruned}.\n"
        f"Reproduce: `python -m vtprune.eval.harness.tune_report --out {out} --methods {','.join(methods)}`.\n\n"
        "| model | method | tuned options | calibration KL (default -> tuned) | feasible trials | accuracy "
        "default (kept) | accuracy tuned (kept) | measured keep default / tuned |\n|---|---|---|---|---|---|---|---|\n"
        + "\n".join(rows)
        + "\n\nThe plan files (`<model>-<method>.json`, for `vtprune.load_plan`) and every trial "
        "(`*.trials.jsonl`) are beside this README.\n"
    )
    write_keeping_notes(folder / "README.md", text)
    print(text)
    return text


def _row(key: str, record: dict, results: dict) -> str:
    """One table row: every method tuned so far (this run's and earlier runs' in results.json)."""
    arch, method = key.split("/")
    a0 = results[f"{arch}/baseline"]["accuracy"]
    default, best = record["default"], record["tuned"]
    return (
        f"| {arch} | {method} | `{_opts(record['options'])}` | {record['kl_default']:.4f} -> "
        f"{record['kl_tuned']:.4f} | {record['feasible']}/{record['trials']} | {default['accuracy']:.3f} "
        f"({default['accuracy'] / a0:.1%}) | {best['accuracy']:.3f} ({best['accuracy'] / a0:.1%}) | "
        f"{default['keep']:.3f} / {best['keep']:.3f} |"
    )


def _opts(options: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in options.items())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/tune")
    ap.add_argument("--methods", default="pdrop")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--keep", type=float, default=0.11)
    ap.add_argument("--calibration", type=int, default=32)
    ap.add_argument("--test", type=int, default=200)
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tolerance", type=float, default=0.04)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    run(
        args.out,
        methods=args.methods.split(","),
        models=args.models.split(","),
        keep=args.keep,
        calibration=args.calibration,
        test=args.test,
        trials=args.trials,
        seed=args.seed,
        tolerance=args.tolerance,
    )


if __name__ == "__main__":
    main()
