"""The ``vtprune`` command: flops, bench and demo run end to end."""

from __future__ import annotations

import json
import statistics

import pytest
import tiny
import torch

import vtprune
from vtprune.cli import main


def test_flops_command_prints_the_paper_numbers(capsys):
    main(["flops", "llava-1.5-7b", "--plans", "baseline,pdrop:layers=8+16+24,ratio=0.5"])
    out = capsys.readouterr().out
    assert "| baseline | 576 | 576.0 | 3.82 |" in out
    assert "| pdrop:layers=8+16+24,ratio=0.5 | 576 | 270.0 | 1.78 |" in out


def test_bench_command_quick(tmp_path, capsys):
    main(
        [
            "bench",
            "--quick",
            "--layers",
            "8",
            "--plans",
            "baseline;fastv:layer=1,keep=0.25;random:keep=0.5;uniform:keep=0.5",
            "--baseline-every",
            "2",
            "--out",
            str(tmp_path),
        ]
    )
    report = json.loads((tmp_path / "prefill_bench.json").read_text())
    runs = report["results"]["1"]
    # --quick: 2 repeats; each repeat times the baseline before the 3 plans and after every 2 of them
    assert len(runs["baseline"]["times"]) == 2 * 3
    for plan in ("fastv:layer=1,keep=0.25", "uniform:keep=0.5"):
        assert len(runs[plan]["paired_speedups"]) == 2
        assert runs[plan]["measured_speedup"] == pytest.approx(
            statistics.median(runs[plan]["paired_speedups"]), rel=1e-3
        )
    assert "FLOPs-allowed speedup" in capsys.readouterr().out


def test_bench_rejects_bad_baseline_every(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--quick", "--baseline-every", "0"])
    assert "--baseline-every must be at least 1, got 0" in capsys.readouterr().err


def test_demo_prints_every_method(capsys, monkeypatch):
    from vtprune.eval.speed import bench_prefill

    timed = {}

    def spy(model, kw, plans, repeats, warmup, baseline_every=4):
        timed.update(plans=plans, repeats=repeats, warmup=warmup)
        timed["results"] = real(model, kw, plans, repeats, warmup, baseline_every)
        return timed["results"]

    real = bench_prefill.time_plans
    monkeypatch.setattr(bench_prefill, "time_plans", spy)
    main(["demo", "--n", "4", "--methods", "fastv,uniform", "--repeats", "2"])
    out = capsys.readouterr().out
    lines = out.splitlines()
    for plan in ("baseline", "fastv", "uniform"):
        assert any(line.startswith(f"{plan} ") for line in lines), plan
    assert "visual tokens per layer" in out and "Time is indicative only" in out
    # time is the benchmark's: warmed up, repeated, each plan paired with unpruned runs around it
    assert timed["plans"] == ["baseline", "fastv:keep=0.5", "uniform:keep=0.5"]
    assert timed["repeats"] == 2 and timed["warmup"] >= 1
    for plan in ("fastv", "uniform"):
        r = timed["results"][f"{plan}:keep=0.5"]
        assert len(r["paired_speedups"]) == 2
        (line,) = [line for line in lines if line.startswith(f"{plan} ")]
        saved = 1 - 1 / statistics.median(r["paired_speedups"])
        assert f" {saved:>6.0%}  " in line  # the time-saved column, just before the token counts


def test_fastv_mean_score_uses_all_text_queries():
    model = tiny.llava()
    kw = tiny.inputs("llava", model, [1], seed=60, post=[12])
    with torch.no_grad():
        with vtprune.pruned(model, "fastv", keep=0.5):
            model(**kw)
            last = vtprune.stats(model).selections
        with vtprune.pruned(model, "fastv", keep=0.5, score="mean"):
            model(**kw)
            mean = vtprune.stats(model).selections
    (key,) = last
    assert last[key][0].numel() == mean[key][0].numel()
    assert not torch.equal(last[key][0], mean[key][0])


@pytest.mark.parametrize("argv", [["flops", "no-such-model"]])
def test_cli_errors_name_the_problem(argv):
    with pytest.raises(ValueError, match="no-such-model"):
        main(argv)


def test_decode_benchmark_reports_kv_and_speed(tmp_path):
    from vtprune.eval.speed.bench_decode import main as decode_main

    plans = "baseline;mustdrop:keep=0.25,decode=false;mustdrop:keep=0.25"
    res = decode_main(
        ["--width", "32", "--tokens", "2", "--repeats", "1", "--plans", plans, "--out", str(tmp_path)]
    )
    kv = [res[p]["kv_cache_bytes"] for p in plans.split(";")]
    assert kv[0] > kv[1] > kv[2]  # the decode stage re-indexes earlier layers: less cache again
    assert (tmp_path / "decode_bench.md").exists()


def test_demo_model_must_be_a_shipped_tiny_model(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--model", "/data/llava-1.5-7b"])
    err = capsys.readouterr().err
    assert "invalid choice: '/data/llava-1.5-7b'" in err and "qwen2_vl" in err
