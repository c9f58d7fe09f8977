"""The backbone: keep-everything == unpruned, remove == original, cached == uncached, batch == rows."""

from __future__ import annotations

import pytest
import tiny
import torch
from helpers import count_hooks, greedy, row_alone, uncached_greedy

import vtprune

FAMILIES = ["llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_onevision"]
PLANS = {
    "fastv": dict(keep=0.5),
    "pdrop": dict(keep=0.4),
    "random": dict(keep=0.3),
    "uniform": dict(keep=0.25),
    "hired": dict(keep=0.3),
    "visionzip": dict(keep=0.3),
    "divprune": dict(keep=0.3),
    "cdpruner": dict(keep=0.3),
    "todre": dict(keep=0.3),
    "sparsevlm": dict(keep=0.3, recycle=True),
    "dart": dict(keep=0.5),
    "transprune": dict(keep=0.4),
    "temporal": dict(keep=0.3),
    "vscan": dict(keep=0.3),
    "vflowopt": dict(keep=0.3, cell=2),
    # the decode stage makes decoding differ from an uncached recomputation by design; it is
    # checked on its own in test_vision_methods.py
    "mustdrop": dict(keep=0.4, decode=False),
    "layerskip": dict(keep=0.5, thin_ffn=True),
}
KEEP_ALL = {
    "fastv": dict(keep=1.0),
    "pdrop": dict(keep=1.0),
    "random": dict(keep=1.0),
    "uniform": dict(keep=1.0),
    "hired": dict(keep=1.0),
    "visionzip": dict(keep=1.0),
    "divprune": dict(keep=1.0),
    "cdpruner": dict(keep=1.0),
    "todre": dict(keep=1.0),
    "sparsevlm": dict(keep=1.0, recycle=True),
    "dart": dict(keep=1.0),
    "transprune": dict(keep=1.0),
    "temporal": dict(keep=1.0),
    "vscan": dict(keep=1.0),
    "vflowopt": dict(keep=1.0, cell=2),
    "mustdrop": dict(keep=1.0),
    "layerskip": dict(keep=1.0, thin_ffn=True, ffn_ratio=1),
    "prefixkv": dict(keep=1.0),  # its other tables are in test_prefixkv.py (a decode-time method)
}


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request):
    return request.param, tiny.BUILDERS[request.param]()


@pytest.mark.parametrize("method", sorted(KEEP_ALL))
def test_keep_everything_equals_unpruned(family_model, method):
    family, model = family_model
    kw = tiny.inputs(family, model, [1, 2, 0], seed=1)
    with torch.no_grad():
        ref = model(**kw).logits
        with vtprune.pruned(model, method, **KEEP_ALL[method]):
            out = model(**kw).logits
    assert torch.equal(out, ref)


@pytest.mark.parametrize("method", sorted(PLANS))
def test_remove_restores_exact_outputs_and_module_tree(family_model, method):
    family, model = family_model
    kw = tiny.inputs(family, model, [1], seed=2)
    tree, hooks = str(model), count_hooks(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = model(**kw).logits
        handle = vtprune.apply(model, method, **PLANS[method])
        pruned = model(**kw).logits
        assert not torch.equal(pruned, ref)
        handle.remove()
        after = model(**kw).logits
    assert torch.equal(after, ref)
    assert str(model) == tree and count_hooks(model) == hooks
    assert "get_image_features" not in vars(model.model)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("method", sorted(PLANS))
def test_cached_generate_equals_uncached_pruned_steps(family_model, method):
    family, model = family_model
    kw = tiny.inputs(family, model, [1], seed=3)
    with vtprune.pruned(model, method, **PLANS[method]):
        cached = greedy(model, kw, 6)
        selections = vtprune.stats(model).selections
        assert selections, "the plan recorded no selection"
        reference = uncached_greedy(model, kw, selections, 6)
    assert torch.equal(cached, reference)


@pytest.mark.parametrize("method", sorted(PLANS))
def test_left_padded_batch_equals_rows_alone(family_model, method):
    family, model = family_model
    images = [1, 2, 0]
    sizes = {
        "llava_next": [(32, 64), (64, 64), (64, 32)],
        "qwen2_vl": [(16, 16), (8, 12), (12, 16)],
        "qwen2_5_vl": [(8, 12), (8, 8), (12, 8)],
        "llava_onevision": [(20, 40), (40, 40), (30, 50)],  # 1 x 2 tiles; 2 x 2 and 3 x 3 downscaled
        "qwen3_vl": [(8, 12), (8, 8), (12, 8)],
    }.get(family)
    kw = tiny.inputs(family, model, images, side="left", seed=4, sizes=sizes)
    with vtprune.pruned(model, method, **PLANS[method]):
        batch = greedy(model, kw, 5)
        rows = [greedy(model, row_alone(family, kw, b, images), 5) for b in range(len(images))]
    assert torch.equal(batch, torch.cat(rows))


@pytest.mark.parametrize("method", ["fastv", "pdrop"])
def test_right_padded_forward_equals_rows_alone(family_model, method):
    family, model = family_model
    images = [1, 1]
    kw = tiny.inputs(family, model, images, side="right", seed=5, post=[2, 9])
    with torch.no_grad(), vtprune.pruned(model, method, **PLANS[method]):
        batch = model(**kw).logits
        for b in range(2):
            alone = model(**row_alone(family, kw, b, images)).logits[0]
            real = kw["attention_mask"][b].bool()
            got = batch[b, real]
            kept = got.abs().sum(-1) > 0  # pruned positions have no output
            torch.testing.assert_close(got[kept], alone[kept], rtol=1e-4, atol=1e-4)
            assert torch.equal(alone[~kept].abs().sum(-1), torch.zeros(int((~kept).sum())))
