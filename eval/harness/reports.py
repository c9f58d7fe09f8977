"""Reports of a ``results.json``: one Markdown table and three kinds of PNG plots.

The table has one row per task x plan: score, accuracy kept, loyalty, equivalent tokens,
TFLOPs (counted and by the papers' formula), prefill ms, decode ms/token, KV-cache MB and the
method's overhead share. Plots (matplotlib, Agg backend, so no display is needed): accuracy vs
equivalent tokens per method, the per-layer visual token pyramid of every plan, and latency bars.
The benchmarks (``bench_prefill``, ``bench_decode``, ``bench_gemm``) publish through
:func:`publish_benchmark`.
"""

from __future__ import annotations

import json
from pathlib import Path

from vtprune.eval.harness.records import plan_slug


def rows(results: dict) -> list[dict]:
    """Flatten ``results["tasks"]`` into one dict per task x plan (meters merged in, ``None`` if absent).

    Example:
        >>> r = {"tasks": {"pope": {"plans": {"baseline": {"main_score": 0.8, "meters": None}}}}}
        >>> rows(r)[0]["task"], rows(r)[0]["method"], rows(r)[0]["prefill_s"]
        ('pope', 'baseline', None)
    """
    out = []
    for task, t in results.get("tasks", {}).items():
        for plan, p in t["plans"].items():
            m = p.get("meters") or {}
            out.append(
                {
                    "task": task,
                    "plan": plan,
                    "method": plan.partition(":")[0],
                    **{k: p.get(k) for k in ("main_metric", "main_score", "accuracy_kept", "loyalty", "n")},
                    **{k: m.get(k) for k in _METER_COLUMNS},
                }
            )
    return out


_METER_COLUMNS = (
    "equivalent_tokens",
    "visual_tokens_in",
    "visual_tokens_per_layer",
    "flops_counted",
    "flops_formula",
    "prefill_s",
    "decode_s_per_token",
    "kv_cache_bytes",
    "overhead_share",
)


def _fmt(value, scale: float = 1.0, digits: int = 3, suffix: str = "", kind: str = "f") -> str:
    if value is None:
        return "-"
    return f"{value * scale:.{digits}{kind}}{suffix}"


def markdown_table(results: dict) -> str:
    """The Markdown report: a header naming the model and settings, then the table.

    Example:
        >>> r = {"model": "m", "tasks": {"pope": {"parser": "strict", "plans": {"baseline": {
        ...     "main_metric": "mean_f1", "main_score": 0.85, "accuracy_kept": 1.0, "loyalty": 1.0}}}}}
        >>> print(markdown_table(r).splitlines()[-1])
        | pope | `baseline` | mean_f1 0.850 | 100.0% | 100.0% | - | - | - | - | - | - | - |
    """
    head = [
        f"# vtprune eval: {results.get('model', '?')}",
        "",
        f"Device {results.get('device', '?')}, dtype {results.get('dtype', '?')}, "
        f"{results.get('world_size', 1)} process(es), batch {results.get('batch_size', '?')}, greedy decoding; "
        "efficiency per sample on one prompt (median of repeats, plans interleaved). "
        "TFLOPs counted = `FlopCounterMode` on the prefill (CPU SDPA not counted by PyTorch); "
        "formula = papers' `4nd²+2n²d+3ndm` over visual tokens only.",
        "",
    ]
    for task, t in results.get("tasks", {}).items():
        head.append(f"- {task}: parser `{t.get('parser')}`, prompt example `{t.get('prompt_example')!r}`")
    head += [
        "",
        "| task | plan | score | acc. kept | loyalty | eq. tokens | TFLOPs counted | TFLOPs formula "
        "| prefill ms | decode ms/tok | KV MB | overhead |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows(results):
        score = f"{r['main_metric']} {_fmt(r['main_score'])}" if r["main_metric"] else "-"
        head.append(
            f"| {r['task']} | `{r['plan']}` | {score} | {_fmt(r['accuracy_kept'], 100, 1, '%')} "
            f"| {_fmt(r['loyalty'], 100, 1, '%')} | {_fmt(r['equivalent_tokens'], digits=1)} "
            f"| {_fmt(r['flops_counted'], 1e-12, 4, kind='g')} | {_fmt(r['flops_formula'], 1e-12, 4, kind='g')} "
            f"| {_fmt(r['prefill_s'], 1e3, 1)} | {_fmt(r['decode_s_per_token'], 1e3, 2)} "
            f"| {_fmt(r['kv_cache_bytes'], 2**-20, 2)} | {_fmt(r['overhead_share'], 100, 1, '%')} |"
        )
    return "\n".join(head) + "\n"


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only: works on headless machines and in worker processes
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy_vs_tokens(task_rows: list[dict], path: Path) -> Path:
    """Main score against equivalent tokens, one line per method, the unpruned model as a star."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    methods: dict[str, list[dict]] = {}
    for r in task_rows:
        if r["equivalent_tokens"] is not None and r["main_score"] is not None:
            methods.setdefault(r["method"], []).append(r)
    for method, rs in methods.items():
        rs = sorted(rs, key=lambda r: r["equivalent_tokens"])
        xs, ys = [r["equivalent_tokens"] for r in rs], [r["main_score"] for r in rs]
        style = (
            {"marker": "*", "markersize": 14, "linestyle": "none"}
            if method == "baseline"
            else {"marker": "o"}
        )
        ax.plot(xs, ys, label=method, **style)
    metric = task_rows[0]["main_metric"] if task_rows else ""
    ax.set(xlabel="equivalent visual tokens (mean per layer)", ylabel=metric, title=task_rows[0]["task"])
    ax.grid(alpha=0.3)
    if methods:
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_token_pyramid(task_rows: list[dict], path: Path) -> Path:
    """Visual tokens per decoder layer of each plan, drawn as a centred pyramid (layer 0 at the bottom)."""
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    rs = [r for r in task_rows if r["visual_tokens_per_layer"]]
    fig, axes = plt.subplots(
        1, max(1, len(rs)), figsize=(2.6 * max(1, len(rs)), 3.6), sharey=True, squeeze=False
    )
    for ax, r in zip(axes[0], rs):
        counts = r["visual_tokens_per_layer"]
        layers = range(len(counts))
        ax.barh(layers, counts, left=[-c / 2 for c in counts], height=0.9, color="tab:blue")
        ax.set_title(f"{r['plan']}\n{r['equivalent_tokens']:.0f} eq. tokens", fontsize=8)
        ax.set_xlabel("visual tokens (bar width)", fontsize=8)
        ax.set_xticks([])  # a centred bar has no meaningful signed axis: label the counts instead
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        if len(counts) <= 40:
            for layer, c in zip(layers, counts):
                ax.text(0, layer, f"{c:g}", ha="center", va="center", fontsize=6, color="white")
        ax.set_xlim(
            -(r["visual_tokens_in"] or max(counts)) / 2 * 1.05,
            (r["visual_tokens_in"] or max(counts)) / 2 * 1.05,
        )
    axes[0][0].set_ylabel("decoder layer")
    return _save(fig, path)


def plot_latency(task_rows: list[dict], path: Path) -> Path:
    """Prefill ms and decode ms/token per plan, side by side."""
    plt = _plt()
    rs = [r for r in task_rows if r["prefill_s"] is not None]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(rs) + 2), 3.6))
    xs = list(range(len(rs)))
    ax.bar([x - 0.2 for x in xs], [1e3 * r["prefill_s"] for r in rs], width=0.4, label="prefill ms")
    ax.bar(
        [x + 0.2 for x in xs], [1e3 * r["decode_s_per_token"] for r in rs], width=0.4, label="decode ms/token"
    )
    ax.set_xticks(xs, [r["plan"] for r in rs], rotation=20, ha="right", fontsize=7)
    ax.set(ylabel="ms", title=rs[0]["task"] if rs else "")
    ax.legend(fontsize=8)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    fig.clf()
    _plt().close(fig)
    return path


def write_report(results: dict | str | Path, output: str | Path) -> dict:
    """Write ``report.md`` and ``plots/<task>_{accuracy_vs_tokens,token_pyramid,latency}.png`` into ``output``.

    ``results`` is the dict ``run_eval`` returned or the path of a ``results.json``.
    Returns ``{"markdown": path, "plots": [paths]}``.

    Example:
        >>> paths = write_report("out/eval/results.json", "out/eval")  # doctest: +SKIP
        >>> [p.name for p in paths["plots"]][:1]  # doctest: +SKIP
        ['synthvqa_accuracy_vs_tokens.png']
    """
    if not isinstance(results, dict):
        results = json.loads(Path(results).read_text())
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    md = output / "report.md"
    md.write_text(markdown_table(results))
    plots = []
    by_task: dict[str, list[dict]] = {}
    for r in rows(results):
        by_task.setdefault(r["task"], []).append(r)
    for task, task_rows in by_task.items():
        stem = output / "plots" / plan_slug(task)
        plots.append(plot_accuracy_vs_tokens(task_rows, Path(f"{stem}_accuracy_vs_tokens.png")))
        plots.append(plot_token_pyramid(task_rows, Path(f"{stem}_token_pyramid.png")))
        plots.append(plot_latency(task_rows, Path(f"{stem}_latency.png")))
    return {"markdown": md, "plots": plots}


def publish_benchmark(report: dict, md: str, out: str | Path | None, name: str) -> None:
    """Print a benchmark's Markdown and, with ``out``, save ``<name>.json`` and ``<name>.md`` there.

    Example:
        >>> publish_benchmark({"x": 1}, "| x |", None, "demo_bench")
        | x |
    """
    print(md)
    if out:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{name}.json").write_text(json.dumps(report, indent=2, default=str))
        (folder / f"{name}.md").write_text(md)


NOTES_HEADING = "## What it shows"


def hand_written_notes(previous: str) -> str:
    """The hand-written analysis at the end of a generated README (from :data:`NOTES_HEADING` on).

    Example:
        >>> hand_written_notes("# table\\n\\n## What it shows\\nDivPrune leads.\\n")
        '\\n## What it shows\\nDivPrune leads.\\n'
        >>> hand_written_notes("# table only\\n")
        ''
    """
    at = previous.find(NOTES_HEADING)
    return "" if at < 0 else "\n" + previous[at:]


def write_keeping_notes(path: str | Path, text: str) -> str:
    """Write a benchmark's generated README ``text`` to ``path``, keeping the hand-written analysis
    a previous version ended with, so re-running a benchmark refreshes its tables without deleting
    what a person wrote about them. Returns what was written."""
    path = Path(path)
    text = text.rstrip("\n") + "\n" + hand_written_notes(path.read_text() if path.exists() else "")
    path.write_text(text)
    return text
