"""The offline fidelity benchmark: every method at keep 50%, 25% and 11% on the shipped tiny models.

Runs the evaluation harness (``vtprune eval``) on SynthVQA for each shipped tiny model with the unpruned
baseline and every method at each keep fraction, then writes ``README.md`` with one table per model:
accuracy kept (pruned accuracy / unpruned accuracy) and the equivalent visual tokens (mean tokens per
decoder layer) of each plan, plus the per-question-type accuracies. The harness's own outputs (per-sample
JSONL, ``results.json``, ``report.md`` and plots) stay in ``<out>/<model>/``; an interrupted run resumes.

    python -m vtprune.eval.fidelity --out results/fidelity --limit 400

Example:
    >>> plans(["fastv"], [0.5])
    ['baseline', 'fastv:keep=0.5']
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vtprune.config import method_names

from .cli_eval import main as eval_main
from .synthvqa import QTYPES

__all__ = ["fidelity_table", "plans", "run"]

KEEPS = (0.5, 0.25, 0.11)
MODELS = {"llava": "tiny LLaVA-1.5 architecture", "qwen2_vl": "tiny Qwen2-VL architecture"}


def plans(methods: list[str], keeps: list[float]) -> list[str]:
    """The baseline then ``method:keep=k`` for every method and keep fraction."""
    return ["baseline"] + [f"{m}:keep={k:g}" for k in keeps for m in methods]


def fidelity_table(results: dict, methods: list[str], keeps: list[float]) -> str:
    """Markdown: one row per method, per keep fraction ``accuracy kept (equivalent tokens)``; then
    accuracy per question type for every plan."""
    task = results["tasks"]["synthvqa"]["plans"]
    base = task["baseline"]
    head = "| method | " + " | ".join(f"keep {k:.0%}" for k in keeps) + " |"
    lines = [head, "|---" * (len(keeps) + 1) + "|"]
    lines.append(
        f"| unpruned | accuracy {base['main_score']:.3f}, {base['meters']['equivalent_tokens']:.0f} tokens"
        + " |" * len(keeps)
    )
    for m in methods:
        cells = []
        for k in keeps:
            p = task.get(f"{m}:keep={k:g}")
            if p is None:
                cells.append("-")
                continue
            cells.append(f"{100 * p['accuracy_kept']:.1f}% ({p['meters']['equivalent_tokens']:.1f})")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| plan | " + " | ".join(QTYPES) + " | overall | loyalty |",
        "|---" * (len(QTYPES) + 3) + "|",
    ]
    for name, p in task.items():
        per = p["score"]["per_qtype"]
        lines.append(
            f"| `{name}` | "
            + " | ".join(f"{per.get(q, 0.0):.3f}" for q in QTYPES)
            + f" | {p['main_score']:.3f} | {100 * p['loyalty']:.1f}% |"
        )
    return "\n".join(lines) + "\n"


def run(out: str, limit: int = 400, models=tuple(MODELS), keeps=KEEPS, batch_size: int = 16) -> str:
    """Evaluate every plan on each shipped tiny model into ``out/<model>/``; write ``out/README.md``."""
    methods = method_names()
    sections = []
    for arch in models:
        folder = Path(out) / arch
        args = ["--model", arch, "--tasks", "synthvqa", "--limit", str(limit), "--output", str(folder)]
        args += ["--plans", ",".join(plans(methods, list(keeps)))]
        args += ["--batch-size", str(batch_size), "--max-new-tokens", "3"]
        eval_main(args)
        results = json.loads((folder / "results.json").read_text())
        sections.append(
            f"## {MODELS[arch]} (`vtprune/assets/`, {results['tasks']['synthvqa']['n_samples']} held-out "
            f"questions)\n\nCells: accuracy kept (equivalent visual tokens per layer). Plots and the full "
            f"efficiency report (FLOPs, prefill and decode time, KV cache): [`{arch}/report.md`]({arch}/report.md).\n\n"
            + fidelity_table(results, methods, list(keeps))
        )
    text = (
        "# Offline fidelity benchmark: accuracy kept vs equivalent tokens\n\n"
        "Every method at keep 50%, 25% and 11% (layer-average fraction of visual tokens) on SynthVQA, the\n"
        "procedurally generated VQA task (`vtprune.eval.synthvqa`), with the tiny models shipped in\n"
        "`vtprune/assets` (trained by `vtprune.eval.train_tiny`). Greedy answers, split `test`, seed 0.\n"
        f"Reproduce: `python -m vtprune.eval.fidelity --out {out} --limit {limit}`.\n\n"
        "Reading the tables: the equivalent tokens are measured, not requested. `layerskip` keeps whole\n"
        "layers (its L_cut), so its 11% rounds to one layer; MustDrop's vision-stage window merge removes\n"
        "much of these mostly-background scenes and counts towards its budget. Prefill\n"
        "times of these tiny models are dominated by per-layer fixed costs; see `results/prefill*` for\n"
        "speed. The tiny models were trained with supervision of their layer-3 answer attention and with\n"
        "per-token probes on the visual tokens (see their READMEs), not with CLS pretraining: text-attention\n"
        "methods (FastV, PDrop, MustDrop) may find these models easier, and CLS-attention methods (HiRED,\n"
        "VisionZip) harder, than real VLMs.\n\n" + "\n\n".join(sections)
    )
    path = Path(out) / "README.md"
    path.write_text(text)
    print(text)
    return text


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--limit", type=int, default=400, help="held-out questions per model")
    ap.add_argument("--models", default="llava,qwen2_vl")
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args(argv)
    run(args.out, args.limit, tuple(args.models.split(",")), batch_size=args.batch_size)


if __name__ == "__main__":
    main()
