"""A tower stage composed with vision stages: the vision stage chooses among the tower's survivors,
its ``keep`` relative to them, exactly as on a model whose tower produced only those tokens."""

from __future__ import annotations

import pytest
import test_equivalence as eq
import tiny
import torch
from helpers import greedy, image_runs, row_alone
from test_divprune import official_rule

import vtprune
from vtprune.config import ModelInfo
from vtprune.stages import expected_tokens_per_layer

QWEN_SIZES = [(16, 16), (8, 12), (12, 16)]


@pytest.fixture(scope="module")
def llava():
    return tiny.llava(tower_layers=8)


@pytest.fixture(scope="module")
def qwen():
    return tiny.qwen2_vl(tower_depth=5)


def _inputs(family, model, images, seed):
    sizes = QWEN_SIZES[: len(images)] if family == "qwen2_vl" else None
    return tiny.inputs(family, model, images, seed=seed, sizes=sizes)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_divprune_after_flowcut_equals_divprune_on_the_survivors(family, llava, qwen):
    """Reference: FlowCut alone, then the official DivPrune loop on the features of the tokens its
    tower let through (what a model whose tower had dropped the others would hand DivPrune)."""
    model = llava if family == "llava" else qwen
    kw = _inputs(family, model, [1, 2], seed=7)
    seen = {}

    def keep_embeds(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"].clone()  # before the compaction: original slots

    hook = model.model.language_model.register_forward_pre_hook(keep_embeds, with_kwargs=True)
    try:
        with torch.no_grad(), vtprune.pruned(model, "flowcut", keep=0.5):
            model(**kw)
            survivors = vtprune.stats(model).selections["flowcut"]
        plan = vtprune.Compose(vtprune.FlowCut(keep=0.5), vtprune.DivPrune(keep=0.5))
        with torch.no_grad(), vtprune.pruned(model, plan):
            model(**kw)
            st = vtprune.stats(model)
    finally:
        hook.remove()
    assert torch.equal(st.selections["flowcut"][0], survivors[0])
    image_id = tiny.IMAGE
    for row, pos in image_runs(kw["input_ids"], image_id):
        left = pos[torch.isin(pos, survivors[row].to(pos.device))]
        assert 0 < left.numel() < pos.numel()
        budget = int(0.5 * left.numel() + 0.5)
        expected = left[official_rule(seen["embeds"][row, left], budget)]
        got = pos[torch.isin(pos, st.selections["divprune"][row].to(pos.device))]
        assert got.tolist() == expected.tolist(), (row, pos[0])


@pytest.mark.parametrize("vision", ["divprune", "hired", "visionzip", "random"])
def test_token_counts_and_estimate_whatever_the_order(llava, vision):
    kw = _inputs("llava", llava, [1, 2], seed=3)
    cfg = vtprune.config.config_from_name(vision, keep=0.5)
    counts = []
    for plan in (
        vtprune.Compose(vtprune.FlowCut(keep=0.5), cfg),
        vtprune.Compose(cfg, vtprune.FlowCut(keep=0.5)),
    ):
        with torch.no_grad(), vtprune.pruned(llava, plan):
            llava(**kw)
            st = vtprune.stats(llava)
        counts.append(st.visual_tokens_per_layer)
        stages = [s for c in plan.configs for s in c.stages(ModelInfo(tiny.LAYERS, "llava"))]
        assert expected_tokens_per_layer(stages, 64, tiny.LAYERS) == [16] * tiny.LAYERS
        assert st.tower_tokens_per_layer[-1] == 33  # the tower keeps half of the 64 patches, plus CLS
    # one image keeps 16 of 64 (half of the tower's 32), two images 32: mean 24 per row
    assert counts[0] == counts[1] == [24.0] * tiny.LAYERS


def test_hired_reads_its_scores_over_the_survivors_only(llava):
    """The CLS attention a vision stage reads at the feature layer (after the tower's drops) sums to
    one over the survivors of the image and is zero elsewhere."""
    kw = _inputs("llava", llava, [1], seed=5)
    from vtprune.methods.hired import HiREDStage

    views = []
    original = HiREDStage.pick

    def spy(self, view, budget):
        views.append(view)
        return original(self, view, budget)

    HiREDStage.pick = spy
    try:
        plan = vtprune.Compose(vtprune.FlowCut(keep=0.5), vtprune.HiRED(keep=0.5))
        with torch.no_grad(), vtprune.pruned(llava, plan):
            llava(**kw)
    finally:
        HiREDStage.pick = original
    (view,) = views
    assert view.num_tokens == 32
    layer = view.feature_layer
    full = view.captured(layer)["cls"][0]  # [tower tokens]: CLS attention of the one crop
    survivors = view.source
    heads = view.captured(layer)["cls_heads"].shape[1]
    assert float(full.sum()) == pytest.approx(heads)  # each head's row: a distribution over present slots
    assert bool((full[survivors] > 0).all())
    dropped = torch.ones_like(full, dtype=torch.bool)
    dropped[survivors] = False
    dropped[0] = False
    assert float(full[dropped].abs().sum()) == 0.0


# flowcut at 0.3 as in test_flowcut's tables: at 0.5 FlowCut alone meets a near-tie on the tiny
# Qwen2-VL padded batch (a packed batch and one row differ in the last float bits in the tower)
PLAN = vtprune.Compose(vtprune.FlowCut(keep=0.3), vtprune.DivPrune(keep=0.5))
KEEP_ALL = vtprune.Compose(vtprune.FlowCut(keep=1.0), vtprune.DivPrune(keep=1.0))


@pytest.fixture
def tables(monkeypatch):
    monkeypatch.setitem(eq.PLANS, PLAN, {})
    monkeypatch.setitem(eq.KEEP_ALL, KEEP_ALL, {})


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_composition_keep_everything_equals_unpruned(tables, family, llava, qwen):
    eq.test_keep_everything_equals_unpruned((family, llava if family == "llava" else qwen), KEEP_ALL)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_composition_cached_generate_equals_uncached(tables, family, llava, qwen):
    eq.test_cached_generate_equals_uncached_pruned_steps((family, llava if family == "llava" else qwen), PLAN)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_composition_padded_batch_equals_rows_alone(family, llava, qwen):
    """The shared table's check, allowing a row that ends (EOS) early alone: the batch pads it after."""
    model = llava if family == "llava" else qwen
    images = [1, 2, 0]
    kw = tiny.inputs(
        family, model, images, side="left", seed=4, sizes=QWEN_SIZES if family == "qwen2_vl" else None
    )
    with vtprune.pruned(model, PLAN):
        batch = greedy(model, kw, 5)
        for b in range(len(images)):
            row = greedy(model, row_alone(family, kw, b, images), 5)[0]
            assert batch[b, : row.numel()].tolist() == row.tolist(), b
            assert bool((batch[b, row.numel() :] == tiny.PAD).all()), b
