"""The offline fidelity benchmark: every method at keep 50%, 25% and 11% on the shipped tiny models.

Runs the evaluation harness (``vtprune eval``) on SynthVQA for each shipped tiny model with the unpruned
baseline and every method at each keep fraction, then writes ``README.md`` with one table per model:
accuracy kept (pruned accuracy / unpruned accuracy) and the equivalent visual tokens (mean tokens per
decoder layer) of each plan, plus the per-question-type accuracies. The harness's own outputs (per-sample
records, merged into ``.jsonl.gz``; ``results.json``, ``report.md`` and plots) stay in ``<out>/<model>/``;
an interrupted run resumes, also from the committed ``results/fidelity``.

    python -m vtprune.eval.harness.fidelity --out results/fidelity --limit 400

Example:
    >>> plans(["fastv"], [0.5])
    ['baseline', 'fastv:keep=0.5']
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vtprune.config import method_names
from vtprune.eval.synthetic.synthvqa import QTYPES, generate_synthvqa
from vtprune.eval.synthetic.tiny_models import load_tiny

from .cli_eval import main as eval_main
from .evidence import object_token_share

__all__ = ["evidence_table", "fidelity_table", "plans", "run", "twin_table"]

EVIDENCE_ITEMS = 80  # scenes for the kept-on-objects diagnostic (the first held-out ones)

KEEPS = (0.5, 0.25, 0.11)
MODELS = {
    "llava": "tiny LLaVA-1.5 architecture",
    "qwen2_vl": "tiny Qwen2-VL architecture",
    "llava_noattn": "tiny LLaVA-1.5 architecture trained without the answer-attention loss (the twin)",
}
TWINS = ("llava", "llava_noattn")  # the same model trained with and without the attention loss


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


def twin_table(task_a: dict, task_b: dict, methods: list[str], keeps: list[float]) -> str:
    """Markdown: accuracy kept of every method on two models side by side (``a / b`` per keep), the
    method's rank among all methods at that keep on each model in brackets (1 = best).

    Example:
        >>> t = lambda v: {"m:keep=0.5": {"accuracy_kept": v}, "n:keep=0.5": {"accuracy_kept": 0.5}}
        >>> print(twin_table(t(0.9), t(0.4), ["m", "n"], [0.5]).splitlines()[2])
        | m | 90.0% (1) / 40.0% (2) |
    """

    def ranks(task: dict, k: float) -> dict[str, int]:
        kept = {m: task[f"{m}:keep={k:g}"]["accuracy_kept"] for m in methods if f"{m}:keep={k:g}" in task}
        order = sorted(kept, key=lambda m: -kept[m])
        return {m: order.index(m) + 1 for m in kept}

    rank_a = {k: ranks(task_a, k) for k in keeps}
    rank_b = {k: ranks(task_b, k) for k in keeps}
    lines = [
        "| method | " + " | ".join(f"keep {k:.0%}" for k in keeps) + " |",
        "|---" * (len(keeps) + 1) + "|",
    ]
    for m in methods:
        cells = []
        for k in keeps:
            a, b = task_a.get(f"{m}:keep={k:g}"), task_b.get(f"{m}:keep={k:g}")
            if a is None or b is None:
                cells.append("-")
                continue
            cells.append(
                f"{100 * a['accuracy_kept']:.1f}% ({rank_a[k][m]}) / {100 * b['accuracy_kept']:.1f}% ({rank_b[k][m]})"
            )
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def evidence_table(shares: dict[str, dict | None], methods: list[str], keeps: list[float]) -> str:
    """Markdown: per method and keep, the share of finally kept visual tokens that lie on objects and the
    share of objects that keep at least one token."""
    image = next((v["objects_in_image"] for v in shares.values() if v), None)
    lines = [
        f"Where the finally kept visual tokens lie: share on object cells (the scenes' own share is "
        f"{100 * image:.1f}%, which random selection matches; higher means the scores find objects) / share "
        f"of each scene's objects keeping at least one token (first {EVIDENCE_ITEMS} held-out scenes):"
        if image is not None
        else "No plan recorded a selection.",
        "",
        "| method | " + " | ".join(f"keep {k:.0%}" for k in keeps) + " |",
        "|---" * (len(keeps) + 1) + "|",
    ]
    for m in methods:
        cells = []
        for k in keeps:
            v = shares.get(f"{m}:keep={k:g}")
            cells.append(
                f"{100 * v['kept_on_objects']:.0f}% / {100 * v['objects_covered']:.0f}%" if v else "-"
            )
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def object_shares(arch: str, plan_names: list[str], folder: Path) -> dict[str, dict | None]:
    """Kept-on-objects share of every plan on the first held-out scenes; saved to ``evidence.json``."""
    model, processor = load_tiny(arch)
    items = generate_synthvqa(EVIDENCE_ITEMS, seed=0, split="test")
    shares = {p: object_token_share(model, processor, p, items) for p in plan_names if p != "baseline"}
    (folder / "evidence.json").write_text(json.dumps(shares, indent=1))
    return shares


def run(out: str, limit: int = 400, models=tuple(MODELS), keeps=KEEPS, batch_size: int = 16) -> str:
    """Evaluate every plan on each shipped tiny model into ``out/<model>/``; write ``out/README.md``."""
    methods = method_names()
    sections, tasks = [], {}
    for arch in models:
        folder = Path(out) / arch
        args = ["--model", arch, "--tasks", "synthvqa", "--limit", str(limit), "--output", str(folder)]
        args += ["--plans", ",".join(plans(methods, list(keeps)))]
        args += ["--batch-size", str(batch_size), "--max-new-tokens", "3"]
        eval_main(args)
        results = json.loads((folder / "results.json").read_text())
        tasks[arch] = results["tasks"]["synthvqa"]["plans"]
        shares = object_shares(arch, plans(methods, list(keeps)), folder)
        sections.append(
            f"## {MODELS[arch]} (`vtprune/assets/`, {results['tasks']['synthvqa']['n_samples']} held-out "
            f"questions)\n\nCells: accuracy kept (equivalent visual tokens per layer). Plots and the full "
            f"efficiency report (FLOPs, prefill and decode time, KV cache): [`{arch}/report.md`]({arch}/report.md).\n\n"
            + fidelity_table(results, methods, list(keeps))
            + "\n"
            + evidence_table(shares, methods, list(keeps))
        )
    if all(t in tasks for t in TWINS):
        a, b = (tasks[t] for t in TWINS)
        sections.insert(
            0,
            "## The two tiny LLaVA models side by side\n\n"
            "The same architecture, data, seed and recipe; `llava` was trained with the answer-attention "
            "loss at decoder layer 3 (held-out accuracy "
            f"{a['baseline']['main_score']:.3f}), `llava_noattn` without it ({b['baseline']['main_score']:.3f}). "
            "Cells: accuracy kept on `llava` / on `llava_noattn`, each with the method's rank among all "
            "methods at that keep on that model (1 = best). A ranking that holds on one model only is a "
            "property of how the model was trained, not of the method.\n\n"
            + twin_table(a, b, methods, list(keeps)),
        )
    text = (
        "# Offline fidelity benchmark: accuracy kept vs equivalent tokens\n\n"
        "Every method at keep 50%, 25% and 11% (layer-average fraction of visual tokens) on SynthVQA, the\n"
        "procedurally generated VQA task (`vtprune.eval.synthetic.synthvqa`), with the tiny models shipped in\n"
        "`vtprune/assets` (trained by `vtprune.eval.synthetic.train_tiny`). Greedy answers, split `test`, seed 0.\n"
        f"Reproduce: `python -m vtprune.eval.harness.fidelity --out {out} --limit {limit}`.\n\n"
        "Reading the tables: the equivalent tokens are measured, not requested. `layerskip` keeps whole\n"
        "layers (its L_cut), so its 11% rounds to one layer; MustDrop's vision-stage window merge removes\n"
        "much of these mostly-background scenes and counts towards its budget. Prefill\n"
        "times of these tiny models are dominated by per-layer fixed costs; see `results/prefill*` for\n"
        "speed. The tiny models were trained with supervision of their layer-3 answer attention and with\n"
        "per-token probes on the visual tokens (see their READMEs), not with CLS pretraining. The last table\n"
        "of each model (`vtprune.eval.harness.evidence`) shows the consequence: on the tiny LLaVA, whose CLS attention\n"
        "was never trained to be a saliency map, HiRED and VisionZip at keep 50% keep background more often\n"
        "than chance and leave about half (HiRED) of each scene's objects without a single token, before the\n"
        "language model sees them, while random and uniform selection keep a token of every object. On the\n"
        "tiny Qwen2-VL (substitute score, no CLS token) the same two methods find and cover the objects. Read\n"
        "the CLS-attention rows of the tiny LLaVA as "
        "a property of that model, not of the methods.\n\n"
        "`llava_noattn` is that tiny LLaVA's twin, trained the same way but without the answer-attention\n"
        "loss (`--attn-weight 0`; see `vtprune/assets/tiny-llava-synthvqa-noattn/README.md`): a weaker model\n"
        "(its unpruned accuracy is in its table), so its accuracy-kept ratios sit on a smaller margin above\n"
        "chance. The first table puts the two side by side with each method's rank. `temporal` is a video\n"
        "method: on these still images it keeps the `uniform` lattice by design, so its rows equal\n"
        "`uniform`'s. `flowcut` and `zerotprune` prune inside the vision tower, so their token counts are\n"
        "those reaching the language model and their towers run on fewer tokens too. `prefixkv` prunes the\n"
        "KV cache (all tokens, per layer) after an unpruned prefill: its equivalent tokens are the unpruned\n"
        "count, the first answer token is the unpruned model's, and only later answer tokens read the\n"
        "shortened caches. `vflowopt` ranks by the attention tower hub tokens pay, which on the tiny LLaVA\n"
        "(CLS attention never trained as saliency) lands on background, as its evidence row shows.\n\n"
        + "\n\n".join(sections)
    )
    path = Path(out) / "README.md"
    path.write_text(text)
    print(text)
    return text


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--limit", type=int, default=400, help="held-out questions per model")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args(argv)
    run(args.out, args.limit, tuple(args.models.split(",")), batch_size=args.batch_size)


if __name__ == "__main__":
    main()
