"""FlowCut and the tower stage: the official rule as a plain reference, shared tables, accounting."""

from __future__ import annotations

import pytest
import test_equivalence as eq
import tiny
import torch
from helpers import eager_clip_layer, image_runs, llava_encoder_flops, merger_index, shared_tables
from transformers import LlavaForConditionalGeneration

import vtprune
from vtprune.flops import tower_linear_flops

TOWER = 8  # tower layers of the test models: feature layer 6, pruning after layers 1, 3, 5


def official_rule(model, pixels: torch.Tensor, target: int) -> list[int]:
    """FlowCut's official CLIP loop for one image, written plainly with the full eager attention
    matrix: returns the kept patches (0-based, CLS excluded) in order."""
    tower = model.model.vision_tower
    vm = getattr(tower, "vision_model", tower)
    h = vm.pre_layrnorm(vm.embeddings(pixels))
    layers = vm.encoder.layers
    select_layer = len(layers) - 2
    kept = torch.arange(h.shape[1] - 1)
    cumulative = None
    for idx, layer in enumerate(layers[:select_layer]):
        h, q, k, v, weights = eager_clip_layer(layer, h)  # weights: [1, H, T, T]
        if h.shape[1] <= target + 1:
            continue
        cls_att = weights[:, :, 0, 1:].mean(1)[0]
        semantic = torch.softmax(v[:, :, :1] @ v.transpose(-1, -2), dim=-1).mean(1)[0, 0, 1:]
        density = v.mean(1)[0, 1:].abs().sum(-1)
        score = (cls_att / cls_att.sum() + semantic / semantic.sum()) * density
        cumulative = score if cumulative is None else 0.5 * cumulative + 0.5 * score
        rpl = select_layer - idx - 1
        if rpl % 2:
            continue
        if rpl:
            n = cls_att.numel()
            prob = cls_att / cls_att.sum()
            ratio = -(prob * prob.log()).sum() / torch.log(torch.tensor(float(n)))
            drop = int(((n - target) / rpl**0.5 * (1 - ratio**2)).round())
        else:
            drop = h.shape[1]
        count = max(h.shape[1] - drop, target + 1) - 1
        top = torch.topk(cumulative, count).indices.sort().values
        h = torch.cat([h[:, :1], h[:, 1:][:, top]], dim=1)
        cumulative, kept = cumulative[top], kept[top]
    return kept.tolist()


@pytest.fixture(scope="module")
def llava():
    return tiny.llava(tower_layers=TOWER)


@pytest.mark.parametrize("keep", [0.3, 0.11])
def test_kept_sets_equal_the_official_rule(llava, keep):
    kw = tiny.inputs("llava", llava, [1, 2], seed=7)
    with torch.no_grad(), vtprune.pruned(llava, "flowcut", keep=keep):
        llava(**kw)
        selection = vtprune.stats(llava).selections["flowcut"]
        target = round(keep * 64)
        for i, (row, pos) in enumerate(image_runs(kw["input_ids"])):
            got = torch.nonzero(torch.isin(pos, selection[row].to(pos.device))).flatten().tolist()
            assert got == official_rule(llava, kw["pixel_values"][i : i + 1], target), i


def test_tower_runs_on_fewer_tokens_layer_by_layer(llava):
    kw = tiny.inputs("llava", llava, [2], seed=3)
    with torch.no_grad(), vtprune.pruned(llava, "flowcut", keep=0.25):
        llava(**kw)
        st = vtprune.stats(llava)
    tower = st.tower_tokens_per_layer
    assert len(tower) == TOWER and tower[:2] == [65, 65]
    assert all(a >= b for a, b in zip(tower, tower[1:]))
    assert tower[6:] == [17, 17]  # the feature layer and the last run on the 16 kept patches + CLS
    assert st.visual_tokens_per_layer == [32] * tiny.LAYERS  # two images in the row


# -- the shared equivalence tables, on the family flowcut supports ------------------------------
(
    test_nothing_to_drop_equals_unpruned,
    test_remove_restores_the_model,
    test_cached_generate_equals_uncached,
    test_padded_batch_equals_rows_alone,
) = shared_tables("flowcut", {"llava": "llava"}, plan=dict(keep=0.3))


def test_images_of_one_batch_keep_their_own_counts(llava):
    """Images whose entropy schedules differ are padded in the tower, not cut to one count."""
    kw = tiny.inputs("llava", llava, [2], seed=11)
    with torch.no_grad(), vtprune.pruned(llava, "flowcut", keep=0.11):
        llava(**kw)
        both = vtprune.stats(llava).selections["flowcut"][0]
        for i, (_, pos) in enumerate(image_runs(kw["input_ids"])):
            one = dict(kw, pixel_values=kw["pixel_values"][i : i + 1])
            one["input_ids"] = kw["input_ids"].clone()
            other = image_runs(kw["input_ids"])[1 - i][1]
            keep = torch.ones(kw["input_ids"].shape[1], dtype=torch.bool)
            keep[other] = False
            one["input_ids"], one["attention_mask"] = kw["input_ids"][:, keep], kw["attention_mask"][:, keep]
            llava(**one)
            alone = vtprune.stats(llava).selections["flowcut"][0]
            offset = int(pos[0]) - int(torch.nonzero(one["input_ids"][0] == tiny.IMAGE)[0])
            assert torch.equal(both[torch.isin(both, pos)] - offset, alone), i


# -- LLaVA-1.5 geometry: keep target and FLOPs ----------------------------------------------------
@pytest.fixture(scope="module")
def shaped():
    from vtprune.eval.speed.shapes import llava_config

    torch.manual_seed(0)
    cfg = llava_config(
        32, 4, vision_hidden=16, heads=2, intermediate=64, vocab=tiny.VOCAB, image_token_id=tiny.IMAGE
    )
    cfg.vision_config.num_hidden_layers = TOWER
    model = LlavaForConditionalGeneration(cfg).eval()
    return model, tiny.llava_shaped_inputs(seed=1)


@pytest.mark.parametrize("keep", [0.5, 0.25, 0.11])
def test_keep_target_within_two_percent(shaped, keep):
    model, kw = shaped
    with torch.no_grad(), vtprune.pruned(model, "flowcut", keep=keep):
        model(**kw)
        st = vtprune.stats(model)
    assert abs(st.keep_ratio - keep) / keep <= 0.02, st.keep_ratio
    assert st.tower_tokens_per_layer[-1] == round(keep * 576) + 1


def test_counted_tower_flops_fall_by_the_tokens_removed(shaped):
    model, kw = shaped
    mm, vc = model.model, model.config.vision_config
    full, pruned, tower = llava_encoder_flops(model, kw, "flowcut", keep=0.25)
    proj = sum(p.numel() for n, p in mm.multi_modal_projector.named_parameters() if n.endswith("weight"))
    expected = tower_linear_flops(vc, [577] * TOWER) - tower_linear_flops(vc, tower) + 2 * (576 - 144) * proj
    saving = full - pruned
    # the saving is the tower's and projector's matmuls on the dropped tokens, minus the CLS rows
    assert saving == pytest.approx(expected, rel=0.03)
    assert saving < expected


# -- composition and refusals ---------------------------------------------------------------------
def test_composes_with_a_prefill_stage(llava):
    kw = tiny.inputs("llava", llava, [1], seed=2)
    plan = vtprune.Compose(vtprune.FlowCut(keep=0.5), vtprune.FastV(layer=2, ratio=0.5))
    with torch.no_grad(), vtprune.pruned(llava, plan):
        llava(**kw)
        st = vtprune.stats(llava)
    assert st.visual_tokens_per_layer == [32, 32] + [16] * (tiny.LAYERS - 2)
    assert st.tower_tokens_per_layer[-1] == 33


@pytest.mark.parametrize(
    "family,plan,match",
    [
        (  # FlowCut's second LLaVA-NeXT prune and MustDrop's first share decoder layer 2
            "llava_next",
            vtprune.Compose(vtprune.FlowCut(), vtprune.MustDrop()),
            "flowcut@2, mustdrop@2 all prune before decoder layer 2, and mustdrop@2 reads layer 1's",
        ),
    ],
)
def test_unsupported_plans_are_refused_clearly(family, plan, match):
    model = tiny.BUILDERS[family]()
    with pytest.raises(NotImplementedError, match=match):
        vtprune.apply(model, plan)
    assert vtprune.api.handle_of(model) is None


def test_a_feature_layer_first_in_the_tower_is_refused():
    model = tiny.llava(tower_layers=2)
    with pytest.raises(NotImplementedError, match="nothing to prune before it"):
        vtprune.apply(model, "flowcut")


def test_smoothing_out_of_range_is_named():
    with pytest.raises(
        ValueError, match=r"flowcut: option 'smoothing'=1.0 is invalid; allowed: a number in \[0, 1\)"
    ):
        vtprune.FlowCut(smoothing=1.0)


# -- Qwen2-VL: whole merge groups, the global row ------------------------------------------------
QWEN_SIZES = [(16, 16), (8, 12), (12, 16)]


@pytest.fixture(scope="module")
def qwen():
    return tiny.qwen2_vl(tower_depth=5)  # pruning after blocks 0, 2 and 4 (before the merger)


def test_qwen_merge_groups_stay_whole(qwen):
    kw = tiny.inputs("qwen2_vl", qwen, [1, 2], seed=5, sizes=QWEN_SIZES)
    index, st = merger_index(qwen, kw, "flowcut", keep=0.2)
    groups = index.view(-1, 4)
    assert groups.shape[0] == round(0.2 * 64) + round(0.2 * 24) + round(0.2 * 48)
    assert torch.equal(groups[:, 0] % 4, torch.zeros_like(groups[:, 0]))
    assert torch.equal(groups - groups[:, :1], torch.arange(4).expand_as(groups))
    assert len(st.tower_tokens_per_layer) == 5
    assert st.visual_tokens_per_layer[0] == (round(0.2 * 64) + round(0.2 * 24) + round(0.2 * 48)) / 2


@pytest.fixture
def qwen_tables(monkeypatch, qwen):
    monkeypatch.setitem(eq.PLANS, "flowcut", dict(keep=0.3))
    monkeypatch.setitem(eq.KEEP_ALL, "flowcut", dict(keep=1.0))
    return "qwen2_vl", qwen


def test_qwen_nothing_to_drop_equals_unpruned(qwen_tables):
    eq.test_keep_everything_equals_unpruned(qwen_tables, "flowcut")


def test_qwen_remove_restores_the_model(qwen_tables):
    eq.test_remove_restores_exact_outputs_and_module_tree(qwen_tables, "flowcut")


def test_qwen_cached_generate_equals_uncached(qwen_tables):
    eq.test_cached_generate_equals_uncached_pruned_steps(qwen_tables, "flowcut")


def test_qwen_padded_batch_equals_rows_alone(qwen_tables):
    eq.test_left_padded_batch_equals_rows_alone(qwen_tables, "flowcut")


@pytest.mark.parametrize("keep", [0.5, 0.25, 0.11])
def test_qwen_keep_target_within_two_percent(qwen, keep):
    kw = tiny.inputs("qwen2_vl", qwen, [1], seed=1, sizes=[(32, 32)])  # 256 tokens
    with torch.no_grad(), vtprune.pruned(qwen, "flowcut", keep=keep):
        qwen(**kw)
        got = vtprune.stats(qwen).keep_ratio
    assert abs(got - keep) / keep <= 0.02, got
