"""Tokens per layer, KV-cache lengths, keep targets and counted FLOPs match the configuration."""

from __future__ import annotations

import pytest
import tiny
import torch

import vtprune
from vtprune import compat
from vtprune.config import ModelInfo
from vtprune.flops import count_flops, decoder_linear_flops, paper_flops

N = 576


@pytest.fixture(scope="module")
def shaped():
    model = tiny.llava_shaped()
    return model, tiny.llava_shaped_inputs(seed=1)


def _run(model, kw):
    with torch.no_grad():
        return model(**kw)


def test_fastv_tokens_per_layer_and_kv_lengths(shaped):
    model, kw = shaped
    text = int(kw["attention_mask"].sum()) - N
    with vtprune.pruned(model, "fastv", layer=3, ratio=0.25):
        out = _run(model, kw)
        st = vtprune.stats(model)
    assert st.visual_tokens_in == N
    assert st.visual_tokens_per_layer == [N] * 3 + [144] * 29
    assert st.kv_cache_lengths == [N + text] * 3 + [144 + text] * 29
    cache = compat.output_cache(out)
    assert [cache.layers[i].keys.shape[-2] for i in range(32)] == st.kv_cache_lengths
    assert st.keep_ratio == pytest.approx((3 * 576 + 29 * 144) / 32 / 576)


def test_pdrop_pyramid_tokens_per_layer(shaped):
    model, kw = shaped
    with vtprune.pruned(model, "pdrop", layers=[8, 16, 24], ratio=0.5):
        _run(model, kw)
        st = vtprune.stats(model)
    assert st.visual_tokens_per_layer == [576] * 8 + [288] * 8 + [144] * 8 + [72] * 8
    assert st.equivalent_tokens == 270


KEEP_METHODS = [
    "fastv",
    "pdrop",
    "random",
    "uniform",
    "hired",
    "visionzip",
    "mustdrop",
    "divprune",
    "cdpruner",
    "todre",
    "sparsevlm",
    "dart",
    "transprune",
    "temporal",
    "vscan",
    "vflowopt",
]


# LLaVA-1.5 geometry; Qwen2.5-VL's windows; Qwen3-VL's DeepStack; LLaVA-OneVision tiles
# (downscaled or not) and video, padded
@pytest.mark.parametrize("shape", ["shaped", "qwen25", "qwen3", "onevision"])
@pytest.mark.parametrize("method", KEEP_METHODS)
@pytest.mark.parametrize("keep", [0.5, 0.25, 0.11])
def test_keep_target_within_two_percent(request, shape, method, keep):
    model, kw = request.getfixturevalue(shape)
    with vtprune.pruned(model, method, keep=keep):
        _run(model, kw)
        got = vtprune.stats(model).keep_ratio
    assert abs(got - keep) / keep <= 0.02, (method, keep, got)


def test_counted_flops_fall_by_the_expected_amount(shaped):
    model, kw = shaped
    cfg = model.config.text_config
    text = int(kw["attention_mask"].sum()) - N
    full, _ = count_flops(_run, model, kw)
    with vtprune.pruned(model, "pdrop", layers=[8, 16, 24], ratio=0.5):
        pruned, _ = count_flops(_run, model, kw)
        per_layer = vtprune.stats(model).visual_tokens_per_layer
    expected_saving = decoder_linear_flops(cfg, [N + text] * 32) - decoder_linear_flops(
        cfg, [n + text for n in per_layer]
    )
    saving = full - pruned
    # the saving is the decoder's projections on the dropped tokens, minus the scoring's extra work
    assert saving == pytest.approx(expected_saving, rel=0.03)
    assert saving < expected_saving


def test_paper_formula_reproduces_pyramiddrop_table():
    n_full = [576] * 32
    n_pdrop = [576] * 8 + [288] * 8 + [144] * 8 + [72] * 8
    assert paper_flops(n_full, 4096, 11008) / 1e12 == pytest.approx(3.82, abs=0.005)
    assert paper_flops(n_pdrop, 4096, 11008) / 1e12 == pytest.approx(1.78, abs=0.005)


@pytest.mark.parametrize(
    "cfg, layers",
    [
        (vtprune.PyramidDrop(keep=0.25), [2, 8, 16]),
        (vtprune.PyramidDrop(), [8, 16, 24]),
        (vtprune.PyramidDrop(layers=[10, 20]), [10, 20]),
    ],
)
def test_pdrop_resolution(cfg, layers):
    got, _ = cfg.resolve(ModelInfo(num_layers=32, family="llava"))
    assert got == layers
    got28, _ = vtprune.PyramidDrop().resolve(ModelInfo(num_layers=28, family="qwen2_vl"))
    assert got28 == [7, 14, 21]


def test_stats_cover_batches_with_imageless_rows():
    model = tiny.llava()
    kw = tiny.inputs("llava", model, [1, 0], seed=3)
    with vtprune.pruned(model, "uniform", keep=0.25, timing=True):
        _run(model, kw)
        st = vtprune.stats(model)
    assert st.visual_tokens_in_per_sample == [64, 0]
    assert st.visual_tokens_per_layer == [8.0] * tiny.LAYERS
    assert st.selections["uniform"][1].numel() == 0
    assert st.overhead_s > 0


@pytest.mark.parametrize("keep", [0.5, 0.25, 0.125])
def test_layerskip_keep_is_quantised_to_whole_layers(shaped, keep):
    """L_cut is a whole layer, so layerskip reaches multiples of 1/layers exactly."""
    model, kw = shaped
    with vtprune.pruned(model, "layerskip", keep=keep):
        _run(model, kw)
        assert vtprune.stats(model).keep_ratio == pytest.approx(keep)


def test_hired_then_pdrop_stats_show_both(shaped):
    model, kw = shaped
    plan = vtprune.Compose(vtprune.HiRED(budget=0.5), vtprune.PyramidDrop(layers=[8, 16, 24], ratio=0.5))
    with vtprune.pruned(model, plan):
        _run(model, kw)
        st = vtprune.stats(model)
    assert set(st.selections) == {"hired", "pdrop@8", "pdrop@16", "pdrop@24"}
    assert st.visual_tokens_per_layer == [288] * 8 + [144] * 8 + [72] * 8 + [36] * 8


def test_overhead_is_not_measured_unless_timing_is_asked_for(monkeypatch):
    """Timing synchronises CUDA at every stage, so it is off by default and says so (None)."""
    model = tiny.llava()
    kw = tiny.inputs("llava", model, [1], seed=3)
    with vtprune.pruned(model, "pdrop", keep=0.5):
        _run(model, kw)
        assert vtprune.stats(model).overhead_s is None
    with vtprune.pruned(model, "pdrop", keep=0.5, timing=True):
        _run(model, kw)
        assert vtprune.stats(model).overhead_s > 0


def test_stage_timing_synchronises_cuda_only_when_asked(monkeypatch):
    from types import SimpleNamespace

    from vtprune.runtime.state import RequestState

    syncs = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda dev=None: syncs.append(dev))
    on_gpu = SimpleNamespace(lm_index=SimpleNamespace(device=torch.device("cuda", 0)))
    untimed = RequestState(owner=0, batch=1, orig_len=4, sets=[on_gpu])
    with untimed.timed():
        pass
    assert syncs == [] and untimed.overhead_s is None
    timed = RequestState(owner=0, batch=1, orig_len=4, sets=[on_gpu], overhead_s=0.0)
    with timed.timed():
        pass
    assert len(syncs) == 2 and timed.overhead_s > 0


@pytest.fixture(scope="module")
def onevision():
    model = tiny.llava_onevision(crop=40, num_hidden_layers=32)  # 10 x 10 tokens a crop
    # a 1 x 2 tile grid (10 x 20 kept), a 2 x 2 grid downscaled (20 x 20 -> 14 x 14) and a 4-frame clip
    # (5 x 5 pooled tokens a frame): 310 + 310 + 101 visual tokens in a left-padded batch of two rows
    kw = tiny.media_inputs(
        "llava_onevision", ["iv", "i"], sizes=[(40, 80), (80, 80)], frames=4, cfg=model.config
    )
    return model, kw


@pytest.fixture(scope="module")
def qwen25():
    model = tiny.qwen2_5_vl(num_hidden_layers=32)  # LLaVA's depth: in-LLM methods reach keep=0.11
    # one 32x32-patch image: 256 tokens in 64 windows, enough for 2% at keep=0.11
    return model, tiny.inputs("qwen2_5_vl", model, [1], seed=1, sizes=[(32, 32)])


@pytest.fixture(scope="module")
def qwen3():
    model = tiny.qwen3_vl(num_hidden_layers=32)  # LLaVA's depth: in-LLM methods reach keep=0.11
    return model, tiny.inputs("qwen3_vl", model, [1], seed=1, sizes=[(32, 32)])  # 256 tokens
