"""Hybrid decoders (layer types other than full attention): vision-stage methods run, in-LLM ones refuse."""

from __future__ import annotations

import pytest
import tiny
import torch
from helpers import greedy, row_alone, uncached_greedy

import vtprune

TYPES = ["full_attention", "sliding_attention"] * (tiny.LAYERS // 2)
VISION = {
    "hired": dict(keep=0.3),
    "visionzip": dict(keep=0.3),
    "random": dict(keep=0.3),
    "uniform": dict(keep=0.25),
    "divprune": dict(keep=0.3),
    "cdpruner": dict(keep=0.3),
    "flowcut": dict(keep=0.3),  # a tower stage: it too prunes before the language model
    "zerotprune": dict(keep=0.3),
    "temporal": dict(keep=0.3),
    "vflowopt": dict(keep=0.3, cell=2),
}


@pytest.fixture(scope="module")
def hybrid():
    # a 6-token window, far shorter than the prompts: the sliding layers really differ from full ones
    return tiny.qwen2_vl(use_sliding_window=True, sliding_window=6, max_window_layers=0, layer_types=TYPES)


def test_the_tiny_hybrid_really_slides(hybrid):
    assert hybrid.model.language_model.layers[1].self_attn.sliding_window == 6


@pytest.mark.parametrize("method", sorted(VISION))
def test_vision_stage_methods_run_on_a_hybrid_decoder(hybrid, method):
    kw = tiny.inputs("qwen2_vl", hybrid, [1], seed=31)
    with torch.no_grad():
        ref = hybrid(**kw).logits
        with vtprune.pruned(hybrid, method, keep=1.0):
            assert torch.equal(hybrid(**kw).logits, ref)
    with vtprune.pruned(hybrid, method, **VISION[method]):
        cached = greedy(hybrid, kw, 5)
        st = vtprune.stats(hybrid)
        assert st.visual_tokens_per_layer[0] < st.visual_tokens_in
        assert torch.equal(cached, uncached_greedy(hybrid, kw, st.selections, 5))


def test_padded_batch_equals_rows_alone_on_a_hybrid_decoder(hybrid):
    images = [1, 2, 0]
    kw = tiny.inputs("qwen2_vl", hybrid, images, side="left", seed=32, sizes=[(16, 16), (8, 12), (12, 16)])
    with vtprune.pruned(hybrid, "uniform", keep=0.25):
        batch = greedy(hybrid, kw, 4)
        rows = [greedy(hybrid, row_alone("qwen2_vl", kw, b, images), 4) for b in range(len(images))]
    assert torch.equal(batch, torch.cat(rows))


@pytest.mark.parametrize(
    "method",
    [
        "fastv",
        "pdrop",
        "mustdrop",
        "layerskip",
        "todre",
        "dart",
        "sparsevlm",
        "vscan",
        "transprune",
        "prefixkv",
    ],
)
def test_in_llm_methods_refuse_naming_the_layer_types(hybrid, method):
    hooks = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in hybrid.modules())
    with pytest.raises(NotImplementedError, match="sliding_attention"):
        vtprune.apply(hybrid, method, keep=0.5)
    assert sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in hybrid.modules()) == hooks
