"""The selection-time benchmark runs end to end at a tiny size and reports every row it promises."""

from __future__ import annotations

import json

import pytest
import torch

from vtprune.eval.speed.bench_selection import main


def test_smoke_run_writes_a_table(tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        main(
            [
                "--tokens",
                "36,48",
                "--hidden",
                "16",
                "--keeps",
                "0.25,0.5",
                "--repeats",
                "1",
                "--out",
                str(tmp_path),
            ]
        )
    finally:
        torch.set_num_threads(threads)  # the script sets its own thread count
    report = json.loads((tmp_path / "selection_bench.json").read_text())
    rows = [(r["method"], r["tokens"], r["budget"]) for r in report["results"]]
    methods = ["divprune", "cdpruner", "random", "uniform", "recycle"]
    assert rows == [(m, n, round(k * n)) for n in (36, 48) for m in methods for k in (0.25, 0.5)]
    assert all(r["cpu_ms"] >= 0 and r["wall_ms"] >= 0 for r in report["results"])
    greedy = [r for r in report["results"] if r["method"] in ("divprune", "cdpruner")]
    assert all(r["loop_cpu_ms"] >= 0 and r["per_step_us"] >= 0 for r in greedy)
    assert "| divprune | 36 | 0.25 | 9 |" in (tmp_path / "selection_bench.md").read_text()
    assert "Selection time per image" in capsys.readouterr().out


def test_rejects_unknown_methods(capsys):
    with pytest.raises(SystemExit):
        main(["--methods", "divprune,fastv"])
    assert "--methods: unknown fastv" in capsys.readouterr().err
