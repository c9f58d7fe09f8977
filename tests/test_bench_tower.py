"""The tower benchmark end to end on tiny tower shapes (a few layers, small images)."""

from __future__ import annotations

import pytest

from vtprune.eval.harness.plans import apply_plan
from vtprune.eval.speed import bench_tower as bt


def _tiny(shape):
    """A few layers and small images; the tower tokens of one unpruned layer."""
    if shape == "llava_next":
        model = bt.llava_next_model(32, layers=4, image_size=56)
        return model, bt.llava_next_inputs(model), bt.CROPS * (4 * 4 + 1)  # five crops of 16 patches + CLS
    if shape == "llava15_five_crops":
        model = bt.llava_next_tower_model(32, layers=4, image_size=56)
        return model, bt.llava_inputs(image_size=56), bt.CROPS * (4 * 4 + 1)
    model = bt.qwen2_vl_tower_model(32, depth=3)
    return model, bt.SHAPES["qwen2_vl"][1](model), 32 * 32  # one 448 px image: 1024 patches


@pytest.mark.parametrize("shape", ["llava_next", "llava15_five_crops", "qwen2_vl"])
def test_tower_benchmark_runs_on_a_tiny_shape(shape):
    model, kw, full = _tiny(shape)
    bt.sharpen(model, bt.SHARPEN[shape])
    # zerotprune early (at its default, the layer before the feature layer, it saves little tower
    # compute: on the Qwen2-VL shape only the merger's input, less than its map costs here)
    plans = bt.plan_names(["flowcut", "zerotprune:layers=0+1"], [0.25])
    res = bt.measure(model, kw, plans, repeats=1, warmup=0, baseline_every=1)
    base = res["baseline"]
    assert base["tower_tokens_per_layer"][0] == full and base["flops_speedup"] == 1.0
    for plan in plans[1:]:
        run = res[plan]
        # the merger (Qwen; zerotprune's default prunes only there) or the last layers (CLIP) run on
        # the kept tokens whatever the schedule did before
        assert run["tower_tokens_per_layer"][-1] <= full and run["flops_speedup"] > 1.0
        assert run["median_s"] > 0
        if plan.startswith(
            "flowcut"
        ):  # zerotprune's maps (n^2 per head, counted) can outweigh a tiny tower's saved matmuls
            assert run["counted_flops"] < base["counted_flops"]
        assert run["share_of_allowed"] == pytest.approx(run["measured_speedup"] / run["flops_speedup"])
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
            methods=["flowcut", "zerotprune:layers=0+1"],
            keeps=[0.25],
            results={shape: res},
        )
    )
    assert (
        "`flowcut:keep=0.25`" in md and "`zerotprune:layers=0+1,keep=0.25`" in md and "share of allowed" in md
    )


def test_next_runner_splits_the_image_budget_over_its_crops():
    """Through the LLaVA-NeXT runner the image keeps round(keep * its tokens) patches in all (the
    five-crop LLaVA-1.5 batch keeps round(keep * 16) of each crop instead)."""
    last = {}
    for shape in ("llava_next", "llava15_five_crops"):
        model, kw, _ = _tiny(shape)
        apply_plan(model, "zerotprune:keep=0.25")
        last[shape] = bt.tower_tokens(model, kw, "zerotprune:keep=0.25", 4)[-1]
        if shape == "llava_next":
            n = int((kw["input_ids"] == 999).sum())
            assert n == 16 + 8 * 8 + 8  # base crop, the 2 x 2 crops' grid, one newline per grid row
    assert last["llava_next"] == round(0.25 * 88) + bt.CROPS  # the image's 22 patches, and each crop's CLS
    assert last["llava15_five_crops"] == bt.CROPS * (round(0.25 * 16) + 1)


def test_unknown_shape_is_named(capsys):
    with pytest.raises(SystemExit):
        bt.main(["--shapes", "llava_hd"])
    assert (
        "unknown shape 'llava_hd'; allowed: llava_next, llava15_five_crops, qwen2_vl"
        in capsys.readouterr().err
    )


def test_methods_take_options_and_none_is_refused(capsys):
    assert bt.plan_names(["zerotprune:layers=5+11+17"], [0.5, 0.11]) == [
        "baseline",
        "zerotprune:layers=5+11+17,keep=0.5",
        "zerotprune:layers=5+11+17,keep=0.11",
    ]
    with pytest.raises(SystemExit):
        bt.main(["--methods", ","])
    assert "--methods: at least one method is needed" in capsys.readouterr().err
