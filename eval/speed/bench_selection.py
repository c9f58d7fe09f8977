"""Selection time of the vision-stage methods: how long one image's ``pick`` takes on the CPU.

Set-level selections (DivPrune's greedy max-min, CDPruner's greedy DPP MAP) run a loop of ``k``
steps after an ``O(N^2 D)`` similarity matrix; the issue asks that no step cost milliseconds of
Python. This times ``stage.pick(view, budget)`` on one synthetic image at LLaVA-1.5's
``N = 576`` and LLaVA-NeXT's ``N = 2880`` visual tokens (hidden size 4096, LLaVA-7B's), at keep
11 / 25 / 50 %: the whole pick (median over ``--pick-repeats``), and the greedy loop alone on a
precomputed kernel (median over ``--repeats``), whose time divided by the budget is the cost of
one greedy step. The rest of a pick is the ``O(N^2 D)`` cosine kernel (and, for CDPruner, the
relevance), a single matrix product.

The image is random Gaussian projector outputs (selection time does not depend on the content)
followed by 32 instruction tokens (CDPruner's relevance reads them). The ``recycle`` rows time
the ``recycle="nearest"`` merge alone (``vtprune.recycling``: the dropped tokens folded into a
kept set of the row's budget), the cost any method adds with that option.

Run: ``python -m vtprune.eval.speed.bench_selection --out results/selection`` (about 2 minutes on 2 cores).

Example:
    >>> view = synthetic_view(16, 8, text=4)
    >>> view.num_tokens, tuple(view.features.shape), tuple(view.instruction_embeds.shape)
    (16, (16, 8), (4, 8))
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from vtprune.config import REGISTRY, ModelInfo
from vtprune.diversity import cosine_distances, dpp_greedy_map, max_min_diversity
from vtprune.images import GridSegment, ImageLayout, ImageView
from vtprune.relevance import instruction_relevance

TOKENS = (576, 2880)
KEEPS = (0.11, 0.25, 0.5)
METHODS = ("divprune", "cdpruner", "random", "uniform", "recycle")
GREEDY = ("divprune", "cdpruner")  # methods whose pick is a k-step greedy loop


def synthetic_view(n: int, hidden: int, text: int = 32, seed: int = 0) -> ImageView:
    """One image of ``n`` tokens (a ``rows x cols`` grid, no newlines) in a row followed by
    ``text`` instruction tokens, with random float32 embeddings of width ``hidden``."""
    gen = torch.Generator().manual_seed(seed)
    rows = int(n**0.5)
    while n % rows:
        rows -= 1
    layout = ImageLayout(
        0, torch.arange(n), [GridSegment(0, rows, n // rows, n // rows)], torch.zeros(n, dtype=torch.bool)
    )
    embeds = torch.randn(n + text, hidden, generator=gen)
    instruction = torch.arange(n + text) >= n
    return ImageView(layout, embeds=embeds, instruction=instruction)


def stage_for(method: str, keep: float):
    """The method's vision stage (``"recycle"``: a uniform stage that recycles, for its merge)."""
    name, opts = (method, {}) if method != "recycle" else ("uniform", dict(recycle="nearest"))
    (stage,) = REGISTRY[name](keep=keep, **opts).stages(ModelInfo(num_layers=32, family="llava"))
    return stage


def time_call(fn, repeats: int) -> tuple[float, float]:
    """Median (CPU seconds of this process, wall seconds) of ``fn()`` over ``repeats`` calls.

    With one thread the process CPU time is what the call costs on a free core; on a shared
    machine the wall time also counts the time other processes held the core."""
    cpu, wall = [], []
    with torch.inference_mode():
        for _ in range(repeats):
            c0, w0 = time.process_time(), time.perf_counter()
            fn()
            cpu.append(time.process_time() - c0)
            wall.append(time.perf_counter() - w0)
    return statistics.median(cpu), statistics.median(wall)


def time_method(method: str, view: ImageView, keep: float, budget: int, repeats: int) -> tuple[float, float]:
    stage = stage_for(method, keep)
    if method == "recycle":
        kept = torch.arange(budget) * view.num_tokens // max(budget, 1)
        return time_call(lambda: stage.recycled(view, kept), repeats)
    return time_call(lambda: stage.pick(view, budget), repeats)


def greedy_loop(method: str, view: ImageView):
    """``f(k)`` running only the greedy loop of ``method`` on a kernel computed beforehand."""
    x = view.features
    if method == "divprune":
        d = cosine_distances(x)
        return lambda k: max_min_diversity(x, k, distances=d)
    s = 1.0 - cosine_distances(x)
    q = instruction_relevance(x, view.instruction_embeds)
    return lambda k: dpp_greedy_map(s, q, k)


def run(tokens, keeps, methods, hidden: int, repeats: int, pick_repeats: int) -> list[dict]:
    rows = []
    for n in tokens:
        view = synthetic_view(n, hidden)
        for method in methods:
            loop = greedy_loop(method, view) if method in GREEDY else None
            for keep in keeps:
                budget = int(keep * n + 0.5)
                reps = pick_repeats if method in GREEDY else repeats
                cpu, wall = time_method(method, view, keep, budget, reps)
                row = dict(method=method, tokens=n, keep=keep, budget=budget)
                row.update(cpu_ms=round(cpu * 1e3, 3), wall_ms=round(wall * 1e3, 3))
                if loop is not None:
                    step, _ = time_call(functools.partial(loop, budget), repeats)
                    row["loop_cpu_ms"] = round(step * 1e3, 3)
                    row["per_step_us"] = round(step / max(budget, 1) * 1e6, 2)
                rows.append(row)
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        "# Selection time per image (CPU)",
        "",
        f"hidden {meta['hidden']}, {meta['threads']} torch thread(s), torch {meta['torch']}, {meta['machine']}. "
        "Times are CPU time of the process (one thread: the cost on a free core; `wall` also counts a "
        f"shared machine's other load, {meta['load']}). `pick`: the whole pick of one image (median of "
        f"{meta['pick_repeats']}); `loop`: the greedy loop alone on a precomputed kernel (median of "
        f"{meta['repeats']}); `per step` = loop / budget; "
        '`recycle`: the `recycle="nearest"` merge alone. The rest of a pick is the cosine kernel.',
        "",
        "| method | N | keep | budget | pick CPU ms | pick wall ms | loop CPU ms | per step CPU µs |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['tokens']} | {r['keep']:.2f} | {r['budget']} | {r['cpu_ms']:.1f} | "
            f"{r['wall_ms']:.1f} | {r.get('loop_cpu_ms', '')} | {r.get('per_step_us', '')} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--tokens", default=",".join(map(str, TOKENS)), help="visual tokens per image, comma-separated"
    )
    p.add_argument("--keeps", default=",".join(map(str, KEEPS)))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--pick-repeats", type=int, default=None, help="repeats of a whole greedy pick (default: --repeats)"
    )
    # one thread by default: on a shared machine an idle-spinning OpenMP team turns each small
    # op of a greedy step into a wait for descheduled workers (milliseconds of noise per step)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--out", default=None, help="folder for selection_bench.json / .md")
    a = p.parse_args(argv)
    if a.repeats < 1:
        p.error(f"--repeats must be at least 1, got {a.repeats}")
    if a.threads < 1:
        p.error(f"--threads must be at least 1, got {a.threads}")
    torch.set_num_threads(a.threads)
    pick_repeats = a.repeats if a.pick_repeats is None else a.pick_repeats
    if pick_repeats < 1:
        p.error(f"--pick-repeats must be at least 1, got {pick_repeats}")
    methods = a.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        p.error(f"--methods: unknown {', '.join(unknown)}; allowed: {', '.join(METHODS)}")
    tokens = [int(t) for t in a.tokens.split(",")]
    keeps = [float(k) for k in a.keeps.split(",")]
    meta = dict(
        hidden=a.hidden,
        repeats=a.repeats,
        pick_repeats=pick_repeats,
        load="load average " + " ".join(f"{v:.1f}" for v in os.getloadavg()) + f" on {os.cpu_count()} CPUs",
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        machine=f"{platform.machine()} {platform.processor() or platform.system()}",
    )
    rows = run(tokens, keeps, methods, a.hidden, a.repeats, pick_repeats)
    report = dict(meta=meta, results=rows)
    md = markdown(rows, meta)
    print(md)
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "selection_bench.json").write_text(json.dumps(report, indent=2))
        (out / "selection_bench.md").write_text(md)
    return report


if __name__ == "__main__":
    main()
