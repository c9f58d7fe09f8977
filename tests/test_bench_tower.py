"""The tower benchmark end to end on tiny tower shapes (a few layers, small images)."""

from __future__ import annotations

import pytest

from vtprune.eval.speed import bench_tower as bt


@pytest.mark.parametrize("shape", ["llava_next", "qwen2_vl"])
def test_tower_benchmark_runs_on_a_tiny_shape(shape):
    if shape == "llava_next":
        model, kw = bt.llava_next_tower_model(32, layers=4, image_size=56), bt.llava_inputs(image_size=56)
        full = bt.CROPS * (4 * 4 + 1)  # five crops of 16 patches + CLS
    else:
        model, kw = bt.qwen2_vl_tower_model(32, depth=3), bt.SHAPES["qwen2_vl"][1]()
        full = 32 * 32  # one 448 px image: 1024 patches
    bt.sharpen(model, bt.SHARPEN[shape])
    plans = ["baseline", "flowcut:keep=0.25"]
    res = bt.measure(model, kw, plans, repeats=1, warmup=0, baseline_every=1)
    base, flow = res["baseline"], res["flowcut:keep=0.25"]
    assert base["tower_tokens_per_layer"][0] == full and base["flops_speedup"] == 1.0
    # the merger (Qwen) or the last layers (CLIP) run on the kept tokens whatever the schedule did before
    assert flow["tower_tokens_per_layer"][-1] <= full and flow["flops_speedup"] > 1.0
    assert flow["counted_flops"] < base["counted_flops"] and flow["median_s"] > 0
    assert flow["share_of_allowed"] == pytest.approx(flow["measured_speedup"] / flow["flops_speedup"])
    md = bt.markdown(
        dict(
            machine="test",
            widths={shape: 32},
            sharpen={shape: bt.SHARPEN[shape]},
            threads=1,
            omp_wait_policy="default",
            repeats=1,
            warmup=0,
            baseline_every=1,
            results={shape: res},
        )
    )
    assert "`flowcut:keep=0.25`" in md and "share of allowed" in md


def test_unknown_shape_is_named(capsys):
    with pytest.raises(SystemExit):
        bt.main(["--shapes", "llava_hd"])
    assert "unknown shape 'llava_hd'; allowed: llava_next, qwen2_vl" in capsys.readouterr().err
