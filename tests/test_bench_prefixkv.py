"""The PrefixKV decode benchmark on a tiny LLaVA-shaped model: exact KV bytes and a decode speed
paired with the unpruned baseline's runs around it."""

from __future__ import annotations

import json
import statistics

import pytest

from vtprune.eval.speed.bench_prefixkv import main


def test_kv_bytes_and_paired_decode_steps(tmp_path, capsys):
    argv = ["--width", "64", "--layers", "2", "--tokens", "3", "--repeats", "2", "--warmup", "0"]
    report = main(argv + ["--budgets", "0.2,0.5", "--baseline-every", "1", "--out", str(tmp_path)])
    res = report["results"]
    base = res["baseline"]
    assert len(base["decode_steps_s"]) == 2 * 3  # per repeat: before, between and after the two budgets
    assert base["decode_speedup"] == 1.0
    for budget in (0.2, 0.5):
        r = res[f"prefixkv:keep={budget}"]
        # the cache keeps `budget` of the 640 prompt positions in each of 2 layers (evictions floored)
        assert abs(r["kv_cache_bytes"] / base["kv_cache_bytes"] - budget) <= 2 / 640
        assert len(r["paired_speedups"]) == 2 and len(r["decode_steps_s"]) == 2
        assert r["decode_speedup"] == pytest.approx(statistics.median(r["paired_speedups"]), abs=1e-4)
        assert 0 < r["decode_s_per_token"] < r["generate_s"] and "unpaired_decode_s_per_token" in r
    saved = json.loads((tmp_path / "decode_bench.json").read_text())
    assert saved["tokens"] == 3 and set(saved["results"]) == {
        "baseline",
        "prefixkv:keep=0.2",
        "prefixkv:keep=0.5",
    }
    out = capsys.readouterr().out
    assert "Paired decode speedup" in out and "| `prefixkv:keep=0.2` | 0.12 | 80% |" in out


def test_one_token_has_no_decode_step(capsys):
    with pytest.raises(SystemExit):
        main(["--tokens", "1"])
    assert "--tokens must be at least 2" in capsys.readouterr().err
