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
