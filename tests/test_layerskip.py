"""Visual computation skipping really skips: fewer FLOPs counted, exact when nothing is skipped."""

from __future__ import annotations

import pytest
import tiny
import torch

import vtprune
from vtprune.flops import count_flops


@pytest.fixture(scope="module")
def shaped():
    model = tiny.llava_shaped(layers=8)
    return model, tiny.llava_shaped_inputs(seed=2)


def _flops(model, kw):
    with torch.no_grad():
        return count_flops(model, **kw, logits_to_keep=1)[0]


def test_thin_ffn_halves_visual_mlp_flops(shaped):
    model, kw = shaped
    cfg = model.config.text_config
    full = _flops(model, kw)
    with vtprune.pruned(model, "layerskip", cut=False, thin_ffn=True, ffn_ratio=2):
        thin = _flops(model, kw)
    # each of the 8 layers skips half the MLP (3 matmuls of d x m) for 576 visual rows
    expected = 8 * 576 * 2 * 3 * cfg.hidden_size * (cfg.intermediate_size // 2)
    assert full - thin == expected


def test_cut_removes_visual_tokens_from_l_cut(shaped):
    model, kw = shaped
    with torch.no_grad(), vtprune.pruned(model, "layerskip", cut_layer=3):
        model(**kw)
        st = vtprune.stats(model)
    assert st.visual_tokens_per_layer == [576.0] * 3 + [0.0] * 5
    assert st.kv_cache_lengths[3] == st.kv_cache_lengths[0] - 576


def test_default_cut_follows_the_family():
    from vtprune.config import ModelInfo

    assert vtprune.LayerSkip().cut_at(ModelInfo(32, "llava")) == 16
    assert vtprune.LayerSkip().cut_at(ModelInfo(28, "qwen2_vl")) == 24


def test_remove_restores_mlp_forward():
    model = tiny.llava()
    mlp = model.model.language_model.layers[0].mlp
    with vtprune.pruned(model, "layerskip", thin_ffn=True):
        assert "forward" in vars(mlp)
    assert "forward" not in vars(mlp)


@pytest.mark.parametrize(
    "opts, match", [({"ffn_ratio": 0}, "'ffn_ratio'=0 is invalid"), ({"cut": False}, "every strategy is off")]
)
def test_bad_layerskip_options(opts, match):
    with pytest.raises(ValueError, match=match):
        vtprune.apply(tiny.llava(), "layerskip", **opts)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_window_covering_the_grid_equals_dense_attention(family):
    model = tiny.BUILDERS[family]()
    kw = tiny.inputs(family, model, [1, 1], seed=50)
    valid = kw["attention_mask"].bool()
    with torch.no_grad():
        ref = model(**kw).logits
        with vtprune.pruned(model, "layerskip", cut=False, window=31):
            wide = model(**kw).logits
            assert model.config.text_config._attn_implementation.startswith("vtprune_")
        with vtprune.pruned(model, "layerskip", cut=False, window=3):
            narrow = model(**kw).logits
    torch.testing.assert_close(wide[valid], ref[valid], rtol=1e-5, atol=1e-5)
    assert (narrow[valid] - ref[valid]).abs().max() > 1e-3
    assert model.config.text_config._attn_implementation == "sdpa"


def test_window_attention_scores_fewer_keys(shaped):
    model, kw = shaped
    with vtprune.pruned(model, "layerskip", cut=False, window=31):
        wide = _flops(model, kw)
    with vtprune.pruned(model, "layerskip", cut=False, window=5):
        narrow = _flops(model, kw)
    cfg = model.config.text_config
    # each of 576 visual queries scores w*w neighbour keys (QK^T and PV, 2 FLOPs per MAC, all
    # heads: 4 * hidden per key) in each of the 8 layers; the text prefix is the same for both
    assert wide - narrow == 8 * 576 * 4 * cfg.hidden_size * (31 * 31 - 5 * 5)


def test_calibrate_save_load_and_inactive_heads(tmp_path):
    model = tiny.llava()
    samples = [tiny.inputs("llava", model, [1], seed=s) for s in range(3)]
    mask = vtprune.calibrate(model, samples, threshold=0.0)
    assert all(all(row) for row in mask.active)  # every head attends to images a little
    path = tmp_path / "heads.json"
    mask.save(path)
    assert vtprune.HeadMask.load(path).active == mask.active
    kw = tiny.inputs("llava", model, [1, 0], seed=51)
    with torch.no_grad():
        ref = model(**kw).logits
        with vtprune.pruned(model, "layerskip", cut=False, head_mask=str(path)):
            same = model(**kw).logits
        off = vtprune.HeadMask(active=[[True] * 4] * 2 + [[True, False, True, False]] * 6)
        with vtprune.pruned(model, "layerskip", cut=False, head_mask=off):
            changed = model(**kw).logits
    valid = kw["attention_mask"].bool()
    torch.testing.assert_close(same[valid], ref[valid], rtol=1e-5, atol=1e-5)
    assert (changed[valid] - ref[valid]).abs().max() > 1e-3


@pytest.mark.parametrize(
    "opts", [dict(window=3), dict(head_mask=vtprune.HeadMask(active=[[True, False, True, True]] * 8))]
)
def test_attention_strategies_cached_equals_uncached(opts):
    from helpers import greedy, uncached_greedy

    model = tiny.qwen2_vl()
    kw = tiny.inputs("qwen2_vl", model, [1], seed=52)
    with vtprune.pruned(model, "layerskip", cut=False, **opts):
        cached = greedy(model, kw, 5)
        assert torch.equal(cached, uncached_greedy(model, kw, vtprune.stats(model).selections, 5))


def test_head_mask_file_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="cannot read a head mask"):
        vtprune.apply(tiny.llava(), "layerskip", head_mask=str(bad))
