"""Vision-tower FLOPs: the formula by hand, against the meta count of every shipped tower, under a
tower stage's schedule in ``vtprune flops``, and from the tokens a real tiny run records."""

from __future__ import annotations

import pytest
import tiny
import torch
from transformers import CLIPVisionConfig

import vtprune
from vtprune.cli import main as cli_main
from vtprune.eval.harness.meters import tower_accounting
from vtprune.eval.speed import flops_report as fr
from vtprune.flops import count_flops, tower_flops
from vtprune.methods.flowcut import LM_LAYER, flowcut_schedule
from vtprune.methods.zerotprune import ZeroTPruneStage

# patch embedding by hand (2 FLOPs per multiply-add): patches x (channels x kernel) x width
PATCH_EMBED = {
    "llava-1.5-7b": 576 * 3 * 14 * 14 * 1024,
    "llava-next-7b": 5 * 576 * 3 * 14 * 14 * 1024,  # base image + 2 x 2 crops of 336 px
    "qwen2-vl-7b": 1024 * 3 * 2 * 14 * 14 * 1280,  # 32 x 32 patches, 2-frame tubelets
    "qwen2.5-vl-7b": 1024 * 3 * 2 * 14 * 14 * 1280,
    "qwen3-vl-8b": 784 * 3 * 2 * 16 * 16 * 1152,  # 28 x 28 patches of 16 px
    "llava-onevision-7b": 5 * 729 * 3 * 14 * 14 * 1152,
}


def test_tower_flops_by_hand_on_a_tiny_config():
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4)
    tokens = [65, 65, 33, 17]
    # per token q, k, v, out (4 d^2) and fc1, fc2 (2 d m), 2 FLOPs per multiply-add; attention 4 n^2 d
    linear = 2 * (4 * 32 * 32 + 2 * 32 * 64)  # 16384 per token per layer
    by_hand = sum(n * linear + 4 * n * n * 32 for n in tokens)
    assert tower_flops(cfg, tokens) == by_hand == 4_207_104  # 180 * 16384 + 128 * (2 * 65^2 + 33^2 + 17^2)
    # two crops of half the tokens each: the same projections, half the attention
    assert tower_flops(cfg, tokens, sequences=2) == sum(n * linear + 2 * n * n * 32 for n in tokens)


@pytest.mark.parametrize("name", sorted(PATCH_EMBED))
def test_layer_formula_equals_the_meta_count(name):
    """What the meta count finds outside the formula's layers is exactly the patch embedding: the
    formula counts every layer (Qwen2.5-VL's windows and gated MLP, CLS rows, crops) as run."""
    rep = fr.flops_report(name, ["baseline"])
    base = rep["plans"][0]
    assert base["vision_tower_tflops"] == rep["vision_tower_tflops"]
    adapter = fr.adapter_for(fr.build_meta_model(fr.load_config(name)))
    layout = fr.tower_sequences(adapter, fr._image_call(adapter, None)[0])
    layers = fr.tower_plan_flops(adapter, *layout)[0]
    assert rep["vision_tower_tflops"] * 1e12 - layers == pytest.approx(2 * PATCH_EMBED[name], rel=1e-9)


@pytest.mark.parametrize("name", sorted(fr.SHIPPED))
def test_every_shipped_config_reports_the_tower_with_and_without_flowcut(name):
    rep = fr.flops_report(name, ["baseline", "flowcut:keep=0.25", "fastv:layer=2,keep=0.25"])
    base, flow, fastv = rep["plans"]
    assert base["vision_tower_tflops"] > flow["vision_tower_tflops"] > 0
    assert fastv["vision_tower_tflops"] == base["vision_tower_tflops"]  # an LLM-side plan leaves the tower
    # what leaves the tower: keep itself, or on LLaVA-NeXT 2k with k solved for the layer average
    # (layers before the LLM layer-1 prune see 2k, the rest k)
    layers = fr.load_config(name).get_text_config().num_hidden_layers
    tower_keep = 2 * 0.25 * layers / (layers + LM_LAYER) if name.startswith("llava-next") else 0.25
    assert flow["projector_tflops"] == pytest.approx(base["projector_tflops"] * tower_keep, rel=0.02)
    for p in rep["plans"]:
        assert p["tower_share"] == pytest.approx(p["vision_tower_tflops"] / p["total_tflops"])
        assert p["total_tflops"] == pytest.approx(
            p["decoder_tflops"] + p["vision_tower_tflops"] + p["projector_tflops"]
        )
    assert flow["tower_share"] > base["tower_share"] and fastv["tower_share"] > base["tower_share"]
    tokens = flow["tower_tokens_per_layer"]
    assert all(a >= b for a, b in zip(tokens, tokens[1:])) and tokens[0] > tokens[-1]
    assert base["tower_tokens_per_layer"] == [tokens[0]] * len(tokens)
    table = fr.format_flops_table(rep)
    assert "tower share" in table and table.count("%") >= 3


def test_entropy_assumption_brackets_the_tower():
    flat, peaked = (
        fr.flops_report("llava-1.5-7b", ["flowcut:keep=0.11"], tower_entropy=h) for h in (1.0, 0.0)
    )
    # entropy 1: nothing leaves before the last pruning layer (after layer 21), so 22 layers at 577
    assert flat["plans"][0]["tower_tokens_per_layer"] == [577] * 22 + [64, 64]
    assert peaked["plans"][0]["tower_tokens_per_layer"] == [t + 1 for t in flowcut_schedule(576, 63, 22, 24)]
    assert peaked["plans"][0]["vision_tower_tflops"] < flat["plans"][0]["vision_tower_tflops"]


def test_cli_prints_the_tower_columns(capsys):
    cli_main(["flops", "qwen2-vl-2b", "--plans", "baseline,flowcut:keep=0.25"])
    out = capsys.readouterr().out
    assert "| tower share |" in out and "flowcut:keep=0.25" in out


def test_tower_flops_from_a_real_run_match_its_recorded_tokens():
    """A tiny LLaVA with an eager tower (so the counter sees the attention matmuls): the tower's
    counted FLOPs under flowcut fall by what the formula gives for the tokens stats recorded,
    and the meters record the formula on those tokens."""
    model = tiny.llava(attn="eager", tower_layers=8)
    kw = tiny.inputs("llava", model, [1], seed=4)
    mm = model.model

    def encode():
        with torch.no_grad():
            return mm.get_image_features(pixel_values=kw["pixel_values"])

    full, _ = count_flops(encode)
    with vtprune.pruned(model, "flowcut", keep=0.25):
        with torch.no_grad():
            model(**kw)
        recorded = vtprune.stats(model).tower_tokens_per_layer
        pruned, _ = count_flops(encode)
    assert recorded[0] == 65 and recorded[-1] == 17 and len(recorded) == 8
    meters = tower_accounting(model, kw, recorded)
    assert meters["tower_tokens_per_layer"] == recorded
    assert meters["tower_flops"] == sum(
        2 * n * (4 * 32 * 32 + 2 * 32 * 64) + 4 * n * n * 32 for n in recorded
    )  # tiny tower: width 32, MLP 64 (tests/tiny.py)
    unpruned = tower_accounting(model, kw, None)
    assert unpruned["tower_tokens_per_layer"] == [65.0] * 8
    proj = sum(p.numel() for n, p in mm.multi_modal_projector.named_parameters() if n.endswith("weight"))
    expected = unpruned["tower_flops"] - meters["tower_flops"] + 2 * (64 - 16) * proj
    # the counted saving also loses the CLS row FlowCut computes beside the attention (one query row
    # per pruning layer, about 2 n d each): within 2% of the formula, never above it
    assert full - pruned == pytest.approx(expected, rel=0.02)
    assert full - pruned < expected


@pytest.mark.parametrize("name", sorted(fr.SHIPPED))
def test_zerotprune_tower_flops_follow_its_steps(name):
    """``vtprune flops`` under zerotprune: the default step (just before the feature layer) saves
    the projector's and language model's share only; explicit early ``layers`` shrink the tower by
    the geometric steps the runtime takes."""
    rep = fr.flops_report(name, ["baseline", "zerotprune:keep=0.25", "zerotprune:keep=0.25,layers=3+7"])
    base, late, early = rep["plans"]
    assert late["projector_tflops"] == pytest.approx(base["projector_tflops"] * 0.25, rel=0.02)
    assert base["vision_tower_tflops"] >= late["vision_tower_tflops"] > early["vision_tower_tflops"]
    tokens, first = early["tower_tokens_per_layer"], base["tower_tokens_per_layer"][0]
    assert tokens[:4] == [first] * 4 and tokens[4] < first and tokens[8] < tokens[4]
    assert tokens[8:] == [tokens[8]] * (len(tokens) - 8)


def test_zerotprune_expected_tower_tokens_match_a_real_run():
    model = tiny.llava(tower_layers=8)
    kw = tiny.inputs("llava", model, [1], seed=4)
    with vtprune.pruned(model, "zerotprune", keep=0.25, layers=[1, 3]):
        with torch.no_grad():
            model(**kw)
        recorded = vtprune.stats(model).tower_tokens_per_layer
    stage = ZeroTPruneStage(0.25, [1, 3], 30, 0.5)
    expected = stage.expected_tower_units(64, 6, 8)
    assert recorded == [n + 1 for n in expected]  # CLS runs beside the patches
    assert expected[0] == 64 and expected[-1] == 16
