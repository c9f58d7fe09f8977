"""The offline fidelity benchmark's video split: accuracy kept on SynthVQA-Video clips.

The shipped tiny Qwen2-VL video model (``qwen2_vl_video``) answers held-out SynthVQA-Video clips
(:mod:`vtprune.eval.synthetic.synthvqa_video`: 8 frames, 4 tubelets x 64 = 256 visual tokens) unpruned
and under each plan at keep 50%, 25% and 11%:

* the image methods that prune in the vision stage with one budget per frame (``video_budget="frame"``,
  every tubelet keeps the same count) and with one budget for the whole clip (``video_budget="clip"``);
* the methods that prune inside the language model (``fastv``, ``dart``): they see the clip as one
  sequence, so they have the clip budget only;
* ``temporal`` (the EVS rule: tokens that repeat the same cell of the previous frame go first).

Accuracy kept is pruned accuracy / unpruned accuracy on the same clips; the measured keep is
``vtprune.stats(model).keep_ratio`` averaged over the batches. Per-clip answers go to
``records.jsonl.gz``, the scores to ``results.json`` (a rerun skips the plans already there), the tables
to ``README.md``.

    python -m vtprune.eval.harness.fidelity_video --out results/fidelity_video --limit 120

Example:
    >>> video_plans(["divprune"], ["fastv"], [0.25])
    ['baseline', 'divprune:keep=0.25,video_budget=frame', 'divprune:keep=0.25,video_budget=clip', 'fastv:keep=0.25']
"""

from __future__ import annotations

import argparse
import gzip
import json
import time
from pathlib import Path

import torch

import vtprune
from vtprune.eval.harness.reports import write_keeping_notes
from vtprune.eval.synthetic.synthvqa import normalize_answer, score_synthvqa
from vtprune.eval.synthetic.synthvqa_video import VIDEO_QTYPES, generate_synthvqa_video
from vtprune.eval.synthetic.tiny_models import load_tiny
from vtprune.eval.synthetic.train_tiny import predict

from .plans import apply_plan

__all__ = ["video_plans", "video_table", "run_video"]

KEEPS = (0.5, 0.25, 0.11)
MODEL = "qwen2_vl_video"
# Vision-stage image methods, run with both budgets. The default is the subset that surely fits the CPU
# time of a shared 2-core machine: the two baselines, an attention score (VisionZip, on Qwen2-VL's
# substitute score) and a diversity rule (DivPrune). The shipped results/fidelity_video adds cdpruner,
# hired, mustdrop, todre (``--frame-methods``) and pdrop, sparsevlm, flowcut, zerotprune and temporal with
# ``min_per_frame=1`` (``--clip-methods``); layerskip (whole layers, no per-token budget) is not run.
FRAME_METHODS = ("random", "uniform", "visionzip", "divprune")
# Methods inside the language model (a clip is one sequence to them), the tower stages (one budget
# per clip, split over its tubelets), and the video method. An entry may carry options after a colon
# (``temporal:min_per_frame=1``): they follow ``keep`` in the plan.
CLIP_METHODS = ("fastv", "dart", "temporal")


def clip_plan(method: str, keep: float) -> str:
    """The plan of a clip-only method entry at ``keep``.

    Example:
        >>> clip_plan("fastv", 0.25), clip_plan("temporal:min_per_frame=1", 0.11)
        ('fastv:keep=0.25', 'temporal:keep=0.11,min_per_frame=1')
    """
    name, _, opts = method.partition(":")
    return f"{name}:keep={keep:g}" + (f",{opts}" if opts else "")


def video_plans(frame_methods, clip_methods, keeps) -> list[str]:
    """The baseline, then per keep: each vision-stage method per frame and per clip, each clip-only
    method."""
    out = ["baseline"]
    for k in keeps:
        for m in frame_methods:
            out += [f"{m}:keep={k:g},video_budget=frame", f"{m}:keep={k:g},video_budget=clip"]
        out += [clip_plan(m, k) for m in clip_methods]
    return out


@torch.no_grad()
def evaluate_plan(model, processor, plan: str, items: list[dict], batch_size: int) -> tuple[dict, list[dict]]:
    """Score one plan: ``(summary, per-clip records)``; the summary has the SynthVQA score plus the
    measured ``keep_ratio`` and ``equivalent_tokens`` (means over batches) and the seconds taken."""
    apply_plan(model, plan)
    t0, answers, keeps, tokens = time.time(), [], [], []
    try:
        for i in range(0, len(items), batch_size):
            answers += predict(model, processor, items[i : i + batch_size], "qwen2_vl", batch_size)
            if plan != "baseline":
                st = vtprune.stats(model)
                keeps.append(st.keep_ratio)
                tokens.append(st.equivalent_tokens)
    finally:
        vtprune.remove(model)
    score = score_synthvqa(items, answers)
    summary = {
        **score,
        "keep_ratio": sum(keeps) / len(keeps) if keeps else 1.0,
        "equivalent_tokens": sum(tokens) / len(tokens) if tokens else None,
        "seconds": round(time.time() - t0, 1),
    }
    records = [
        {
            "plan": plan,
            "id": it["id"],
            "qtype": it["qtype"],
            "answer": it["answer"],
            "prediction": a,
            "correct": normalize_answer(a) == it["answer"],
        }
        for it, a in zip(items, answers)
    ]
    return summary, records


def _cell(results: dict, plan: str, base: float) -> str:
    p = results.get(plan)
    if p is None:
        return "-"
    if not base:  # an unpruned model that answers nothing right leaves no accuracy to keep
        return f"n/a ({100 * p['keep_ratio']:.1f}%)"
    return f"{100 * p['accuracy'] / base:.1f}% ({100 * p['keep_ratio']:.1f}%)"


def video_table(results: dict, frame_methods, clip_methods, keeps) -> str:
    """Markdown: per method and keep, accuracy kept (measured keep) per frame and per clip; then the
    accuracy per question type of every plan.

    Example:
        >>> r = {"baseline": {"accuracy": 0.8, "per_qtype": {}}, "fastv:keep=0.5": {"accuracy": 0.4, "keep_ratio": 0.5, "per_qtype": {}}}
        >>> print(video_table(r, [], ["fastv"], [0.5]).splitlines()[3])
        | fastv | - | 50.0% (50.0%) |
    """
    base = results["baseline"]["accuracy"]
    head = "| method | " + " | ".join(f"keep {k:.0%} per frame | keep {k:.0%} per clip" for k in keeps) + " |"
    lines = [head, "|---" * (2 * len(keeps) + 1) + "|"]
    lines.append(f"| unpruned | accuracy {base:.3f}, 256 tokens" + " |" * (2 * len(keeps)))
    for m in frame_methods:
        cells = []
        for k in keeps:
            cells += [
                _cell(results, f"{m}:keep={k:g},video_budget=frame", base),
                _cell(results, f"{m}:keep={k:g},video_budget=clip", base),
            ]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    for m in clip_methods:
        cells = []
        for k in keeps:
            cells += ["-", _cell(results, clip_plan(m, k), base)]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| plan | " + " | ".join(VIDEO_QTYPES) + " | overall |",
        "|---" * (len(VIDEO_QTYPES) + 2) + "|",
    ]
    for name, p in results.items():
        per = p["per_qtype"]
        lines.append(
            f"| `{name}` | "
            + " | ".join(f"{per.get(q, 0.0):.3f}" for q in VIDEO_QTYPES)
            + f" | {p['accuracy']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def run_video(
    out: str,
    limit: int = 120,
    keeps=KEEPS,
    frame_methods=FRAME_METHODS,
    clip_methods=CLIP_METHODS,
    batch_size: int = 12,
    model_name: str = MODEL,
) -> str:
    """Evaluate every plan on ``limit`` held-out clips (split ``test``, seed 0) into ``out``; returns the
    README text."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    results_path, records_path = folder / "results.json", folder / "records.jsonl.gz"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    if results.get("_meta", {}).get("limit", limit) != limit:
        raise SystemExit(f"{results_path} was made with another --limit; use another --out")
    meta = results.pop("_meta", {"limit": limit, "model": model_name, "split": "test", "seed": 0})
    model, processor = load_tiny(model_name)
    items = generate_synthvqa_video(limit, seed=0, split="test")
    for plan in video_plans(frame_methods, clip_methods, keeps):
        if plan in results:
            continue
        summary, records = evaluate_plan(model, processor, plan, items, batch_size)
        results[plan] = summary
        print(
            f"{plan}: accuracy {summary['accuracy']:.3f}, keep {summary['keep_ratio']:.3f} ({summary['seconds']} s)"
        )
        with gzip.open(records_path, "at") as f:  # appended plan by plan: an interrupted run keeps them
            f.writelines(json.dumps(r) + "\n" for r in records)
        results_path.write_text(json.dumps({"_meta": meta, **results}, indent=1))
    text = readme_text(results, meta, out, frame_methods, clip_methods, keeps)
    write_keeping_notes(folder / "README.md", text)
    print(text)
    return text


def readme_text(results: dict, meta: dict, out: str, frame_methods, clip_methods, keeps) -> str:
    return (
        "# Offline fidelity benchmark, video split: accuracy kept on SynthVQA-Video\n\n"
        f"The tiny Qwen2-VL video model (`vtprune/assets/tiny-qwen2vl-synthvqa-video`) on {meta['limit']}\n"
        "held-out clips (`generate_synthvqa_video(n, seed=0, split='test')`: 8 frames of 192x192, 4 tubelets\n"
        "x 64 = 256 visual tokens; questions on motion direction, presence in the first/last frame and the\n"
        "number of objects over the clip, balanced). Greedy answers.\n"
        "Reproduce: `python -m vtprune.eval.harness.fidelity_video "
        f"--out {out} --limit {meta['limit']} --frame-methods {','.join(frame_methods)} "
        f"--clip-methods {','.join(clip_methods)}`.\n\n"
        "Cells: accuracy kept (pruned / unpruned accuracy on the same clips) and, in brackets, the measured\n"
        'keep (`vtprune.stats(model).keep_ratio`, mean over batches). *per frame*: `video_budget="frame"`,\n'
        'each tubelet keeps the same share; *per clip*: `video_budget="clip"`, one budget over the clip.\n'
        "`fastv` and `dart` prune inside the language model, where the clip is one sequence (clip budget\n"
        "only); `flowcut` and `zerotprune` prune inside the vision tower (one budget per clip, split over\n"
        "its tubelets); `temporal` is the video method (EVS rule), `min_per_frame=1` our floor that gives\n"
        "every frame its fair share first. Image methods run: "
        + ", ".join(f"`{m}`" for m in frame_methods)
        + " (a subset that fits the CPU time of this benchmark).\n\n"
        + video_table(results, frame_methods, clip_methods, keeps)
    )


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--limit", type=int, default=120, help="held-out clips (a multiple of 12 is balanced)")
    ap.add_argument("--batch-size", type=int, default=12)
    ap.add_argument("--frame-methods", default=",".join(FRAME_METHODS), help="vision-stage methods")
    ap.add_argument("--clip-methods", default=",".join(CLIP_METHODS), help="LLM-stage / video methods")
    args = ap.parse_args(argv)
    run_video(
        args.out,
        args.limit,
        frame_methods=tuple(args.frame_methods.split(",")),
        clip_methods=tuple(args.clip_methods.split(",")),
        batch_size=args.batch_size,
    )


if __name__ == "__main__":
    main()
