"""The LLaVA prefill benchmark: a run killed midway resumes from its checkpoint, and the tower
depth option (for methods that read two tower layers) is recorded in the table."""

from __future__ import annotations

import json

import pytest

from vtprune.eval.speed import bench_prefill
from vtprune.eval.speed.bench_prefill import main

ARGS = ["--quick", "--layers", "2", "--plans", "baseline;random:keep=0.5"]


def test_killed_run_resumes_from_its_last_repeat(tmp_path, monkeypatch):
    real, calls = bench_prefill._time_plan, []

    def dies_in_second_repeat(*a, **k):
        calls.append(1)
        if len(calls) == 4:  # one repeat is baseline, plan, baseline
            raise RuntimeError("killed")
        return real(*a, **k)

    monkeypatch.setattr(bench_prefill, "_time_plan", dies_in_second_repeat)
    with pytest.raises(RuntimeError, match="killed"):
        main(ARGS + ["--out", str(tmp_path)])  # --quick: 2 repeats
    partial = tmp_path / "prefill_bench.partial.json"
    saved = json.loads(partial.read_text())["batches"]["1"]
    assert saved["timing"]["repeats_done"] == 1
    assert set(saved["counts"]) == {"baseline", "random:keep=0.5"}
    first = saved["timing"]["results"]["random:keep=0.5"]["times"]
    assert len(first) == 1 and not (tmp_path / "prefill_bench.json").exists()

    monkeypatch.setattr(bench_prefill, "_time_plan", real)
    report = main(ARGS + ["--out", str(tmp_path), "--resume"])
    run = report["results"][1]["random:keep=0.5"]
    assert run["times"][0] == first[0] and len(run["times"]) == 2 and len(run["paired_speedups"]) == 2
    assert len(report["results"][1]["baseline"]["times"]) == 4  # before and after each repeat
    assert run["counted_flops"] == saved["counts"]["random:keep=0.5"]["counted_flops"]
    assert not partial.exists() and (tmp_path / "prefill_bench.json").exists()


def test_resume_refuses_other_settings_or_no_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="no checkpoint at"):
        main(ARGS + ["--out", str(tmp_path), "--resume"])
    plans = ["baseline", "random:keep=0.5"]
    settings = dict(plans=plans, batches=[1], width=64, layers=3, warmup=1, baseline_every=4, tower_layers=2)
    bench_prefill.Checkpoint(tmp_path, settings, resume=False).save()
    with pytest.raises(ValueError, match="written with layers=3, this run has layers=2"):
        main(ARGS + ["--out", str(tmp_path), "--resume"])


def test_resume_needs_out(capsys):
    with pytest.raises(SystemExit):
        main(ARGS + ["--resume"])
    assert "--resume needs --out" in capsys.readouterr().err


def test_tower_depth_is_built_and_named(tmp_path, capsys):
    model = bench_prefill.build_model(64, 2, tower_layers=6)
    assert model.config.vision_config.num_hidden_layers == 6
    report = main(ARGS + ["--tower-layers", "6", "--out", str(tmp_path)])
    assert report["tower_layers"] == 6
    assert "a 6-layer width-64 CLIP tower" in capsys.readouterr().out
    main(ARGS)
    assert "CLIP tower" not in capsys.readouterr().out  # the default (2) reads as the old tables did
