"""Qwen2.5-VL: vision-tower scores land on their tokens despite the tower's window-permuted order."""

from __future__ import annotations

import pytest
import tiny
import torch
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as hf

import vtprune
from vtprune import compat
from vtprune.integrations import adapter_for
from vtprune.runtime.state import state_of_cache

SIZES = [(16, 16), (8, 12)]  # patch grids: 8x8 and 4x6 merge units, windows of 2x2 units


def _images(model, kw, method, **opts):
    """The layouts (with captured tower scores) of one pruned forward."""
    with torch.no_grad(), vtprune.pruned(model, method, **opts):
        out = model(**kw)
    state = state_of_cache(compat.output_cache(out))
    return [img for row in state.layouts for img in row]


def _unwindowed(grid_thw, spatial_merge_size, window_size, patch_size, kwargs=None):
    """The tower's window index replaced by the identity: its blocks then run in token order."""
    _, cu = _real_window_index(grid_thw, spatial_merge_size, window_size, patch_size)
    n = int((grid_thw.prod(-1) // spatial_merge_size**2).sum())
    return torch.arange(n), cu


_real_window_index = hf.get_vision_window_index


def test_tower_scores_and_features_are_read_in_token_order(monkeypatch):
    # every block attends over the whole image, so the tower is equivariant to the window
    # permutation: run in token order, it must give vtprune exactly the same per-token values
    model = tiny.qwen2_5_vl(fullatt=(0, 1, 2))
    kw = tiny.inputs("qwen2_5_vl", model, [2], seed=11, sizes=SIZES)
    got = _images(model, kw, "mustdrop", keep=0.5)
    monkeypatch.setattr(hf, "get_vision_window_index", _unwindowed)
    ref = _images(model, kw, "mustdrop", keep=0.5)
    monkeypatch.undo()
    last = 2
    adapter = adapter_for(model)
    for g, r, (h, w) in zip(got, ref, SIZES):
        score, ref_score = adapter.image_view(g).cls_scores(last), adapter.image_view(r).cls_scores(last)
        torch.testing.assert_close(score, ref_score, rtol=1e-5, atol=1e-7)
        assert int(score.argmax()) == int(ref_score.argmax())
        for name, layer in (("keys", last), ("hidden", 0)):
            torch.testing.assert_close(g.vision[layer][name], r.vision[layer][name], rtol=1e-5, atol=1e-6)
        # the check has teeth: in the window order the same scores sit on other tokens
        order = adapter.vision_patch_order(torch.tensor([[1, h, w]]), {})
        assert not torch.equal(order, torch.arange(order.numel()))
        windowed = r.vision[last]["received"][order].view(g.num_tokens, -1).mean(1)
        assert not torch.allclose(windowed, ref_score)


def test_scores_come_from_a_full_attention_block_by_default():
    model = tiny.qwen2_5_vl()  # blocks 0 and 2 window attention, block 1 full
    kw = tiny.inputs("qwen2_5_vl", model, [1], seed=12)
    adapter = adapter_for(model)
    for method, layers in (("hired", [0, 1]), ("visionzip", [1]), ("mustdrop", [1])):
        with vtprune.pruned(model, method, keep=0.5) as handle:
            assert handle.stages[0].vision_layers(adapter) == layers, method  # hired: split layer 0 too
    img = _images(model, kw, "hired", keep=0.5)[0]
    view = adapter.image_view(img)
    assert view.score_layer == 1 and view.default_block(view.tower_layers - 1) == 1
    # a full block's received attention is a distribution over the whole image
    assert float(img.vision[1]["received"].sum()) == pytest.approx(1.0, abs=1e-5)


def test_explicit_window_block_scores_stay_inside_each_window():
    model = tiny.qwen2_5_vl()
    kw = tiny.inputs("qwen2_5_vl", model, [1], seed=13, sizes=[(16, 16)])  # 8x8 units, 4x4 windows
    img = _images(model, kw, "hired", keep=0.5, select_layer=2)[0]
    per_unit = img.vision[2]["received"].view(64, 4).sum(1)  # token order: 4 patches per unit
    r, c = torch.arange(64) // 8, torch.arange(64) % 8
    window = (r // 2) * 4 + c // 2
    # each window's queries spread all their attention over that window's patches
    torch.testing.assert_close(torch.bincount(window, per_unit), torch.ones(16), rtol=1e-5, atol=1e-5)
