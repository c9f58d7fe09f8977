"""The matmul-throughput benchmark measures the row counts the prefill plans produce."""

from __future__ import annotations

import json

import pytest

from vtprune.eval.speed.bench_gemm import main, rows_for


def test_rows_follow_the_llava_geometry():
    assert rows_for(1.0, 1) == 640
    assert rows_for(0.11, 1) == 63 + 64
    assert rows_for(0.5, 4) == 4 * (288 + 64)


def test_smoke_run_writes_a_table(tmp_path, capsys):
    main(["--width", "32", "--layers", "2", "--batches", "1,2", "--repeats", "1", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "gemm_bench.json").read_text())
    rows = [(r["batch"], r["keep"], r["rows"]) for r in report["results"]]
    assert rows[:4] == [(1, 1.0, 640), (1, 0.5, 352), (1, 0.25, 208), (1, 0.11, 127)]
    assert len(rows) == 8
    unpruned = [r for r in report["results"] if r["keep"] == 1.0]
    assert all(r["relative_throughput"] == 1.0 for r in unpruned)
    assert all(r["gflops"] > 0 for r in report["results"])
    assert "throughput vs unpruned" in capsys.readouterr().out


def test_rejects_zero_repeats(capsys):
    with pytest.raises(SystemExit):
        main(["--repeats", "0"])
    assert "--repeats must be at least 1, got 0" in capsys.readouterr().err
