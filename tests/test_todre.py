"""ToDRE: both stages against plain references (eager attention), keep accounting, composition."""

from __future__ import annotations

import pytest
import tiny
import torch
from helpers import image_runs, lm_view, unpruned_embeds

import vtprune
from vtprune.methods.todre import ToDRE


def k_center(x: torch.Tensor, k: int, first: int) -> list[int]:
    """Greedy k-center written plainly: from ``first``, repeatedly the row whose cosine distance to
    its nearest chosen row is largest (every minimum recomputed from scratch)."""
    xn = x.float() / x.float().norm(dim=1, keepdim=True)
    d = 1.0 - xn @ xn.T
    chosen = [first]
    while len(chosen) < k:
        far = d[chosen].min(0).values
        far[chosen] = float("-inf")
        chosen.append(int(torch.argmax(far)))
    return sorted(chosen[:k])


def test_vision_stage_is_k_center_from_the_highest_cls_attention_token():
    """Stage 1 on LLaVA: the start is the patch with the largest CLS attention (summed over heads) at
    the feature layer of the tower's own eager attention; then plain k-center on the projector
    outputs."""
    model = tiny.llava(attn="eager")
    kw = tiny.inputs("llava", model, [1], seed=50)
    with torch.no_grad():
        tower = model.model.vision_tower(kw["pixel_values"], output_attentions=True)
    cls = tower.attentions[-2][0, :, 0, 1:].sum(0)  # the feature layer (hidden_states[-2] is its output)
    x = unpruned_embeds(model, kw)
    ((row, pos),) = image_runs(kw["input_ids"])
    cfg = ToDRE(keep=0.2)
    _, vision, _ = cfg.resolve(_info(model))
    k = int(vision * pos.numel() + 0.5)
    expected = pos[k_center(x[row, pos], k, int(cls.argmax()))].tolist()
    _, st = lm_view(model, kw, "todre", keep=0.2)
    assert st.selections["todre-vision"][0].tolist() == expected


def _info(model):
    from vtprune.config import ModelInfo

    return ModelInfo(num_layers=model.config.text_config.num_hidden_layers, family="llava")


@pytest.mark.parametrize("family", ["llava_next", "qwen2_vl"])
def test_isolated_start_keeps_divprunes_set(family):
    """``init="isolated"`` is DivPrune's rule at the vision stage's budget (LLaVA-NeXT: over the
    image's whole sequence; Qwen2-VL: the merger's outputs)."""
    model = tiny.BUILDERS[family]()
    sizes = [(64, 64)] if family == "llava_next" else [(32, 32)]
    kw = tiny.inputs(family, model, [1], seed=51, sizes=sizes)
    _, st = lm_view(model, kw, "todre", keep=0.2, init="isolated")
    kept = st.selections["todre-vision"][0]
    n = int(st.visual_tokens_in)
    with torch.no_grad(), vtprune.pruned(model, "divprune", keep=kept.numel() / n):
        model(**kw)
        assert torch.equal(vtprune.stats(model).selections["divprune"][0], kept)


@pytest.mark.parametrize("family,score", [("llava", "last"), ("qwen2_vl", "last"), ("llava", "mean")])
def test_prefill_stage_keeps_the_instructions_most_attended_tokens(family, score):
    """Stage 2: on the tokens stage 1 left (at their original positions), the decoder's own eager
    attention at layer ``layer - 1`` (the last prompt row, or the mean of the text rows after the
    image; mean over heads) ranks the visual tokens; the count makes the layer average ``keep``."""
    model = tiny.BUILDERS[family](attn="eager")
    kw = tiny.inputs(family, model, [1], seed=52)
    layer, keep = 3, 0.2
    seen, st = lm_view(model, kw, "todre", keep=keep, layer=layer, score=score, init="isolated")
    n_layers = model.config.text_config.num_hidden_layers
    vis_orig = st.selections["todre-vision"][0]
    with torch.no_grad():
        out = model.model.language_model(
            inputs_embeds=seen["embeds"], position_ids=seen["positions"], output_attentions=True
        )
    attn = out.attentions[layer - 1][0].mean(0)  # [L, L], mean over heads
    ids = kw["input_ids"][0]
    image = torch.nonzero(ids == tiny.IMAGE).flatten()
    present = torch.cat([torch.arange(image[0]), vis_orig, torch.arange(image[-1] + 1, ids.numel())])
    vis_local = torch.nonzero(torch.isin(present, vis_orig)).flatten()
    rows = [present.numel() - 1] if score == "last" else list(range(int(vis_local[-1]) + 1, present.numel()))
    scores = attn[rows][:, vis_local].mean(0)
    n, n1 = image.numel(), vis_orig.numel()
    k = int((keep * n * n_layers - layer * n1) / (n_layers - layer) + 0.5)
    expected = set(vis_orig[scores.topk(k).indices].tolist())
    assert set(st.selections[f"todre@{layer}"][0].tolist()) == expected
    assert st.visual_tokens_per_layer == [n1] * layer + [k] * (n_layers - layer)


@pytest.mark.parametrize(
    "family,sizes",
    [
        ("llava", None),
        ("llava_next", [(64, 64), (32, 64), (48, 64)]),
        ("qwen2_vl", [(32, 32), (24, 40)]),
        ("qwen2_5_vl", [(32, 32), (24, 40)]),
    ],
)
@pytest.mark.parametrize("keep,split", [(0.5, 0.5), (0.25, 0.0), (0.11, 0.5)])
def test_keep_is_the_layer_average_over_both_stages(family, sizes, split, keep):
    model = tiny.BUILDERS[family]()
    n_images = len(sizes) if sizes else 3
    kw = tiny.inputs(family, model, [n_images], seed=53, sizes=sizes)
    with torch.no_grad(), vtprune.pruned(model, "todre", keep=keep, split=split):
        model(**kw)
        got = vtprune.stats(model).keep_ratio
    assert abs(got - keep) / keep <= 0.02, (family, keep, split, got)


def test_split_zero_removes_every_visual_token_from_the_layer_on():
    model = tiny.llava()
    kw = tiny.inputs("llava", model, [1], seed=54)
    with torch.no_grad(), vtprune.pruned(model, "todre", keep=0.1, split=0.0, layer=2):
        out = model(**kw)
        per_layer = vtprune.stats(model).visual_tokens_per_layer
    assert per_layer[2:] == [0] * (len(per_layer) - 2) and per_layer[0] == per_layer[1] > 0
    assert torch.isfinite(out.logits).all()


def test_split_sets_how_keep_divides_between_the_stages():
    info = _info(tiny.llava())
    layer, vision, split = ToDRE(keep=0.2, split=0.25).resolve(info)  # 8 layers, stage 2 at 4
    assert (layer, split) == (4, 0.25) and vision == pytest.approx(0.2 * 8 / (4 + 0.25 * 4))
    # keep too large for the split: stage 1 keeps everything and stage 2 the rest
    assert ToDRE(keep=0.9, split=0.5).resolve(info) == (4, 1.0, pytest.approx((0.9 * 8 - 4) / 4))


def test_composes_with_a_later_pyramid_drop():
    """todre, then PyramidDrop two layers before the end: each stage drops its own count."""
    model = tiny.llava()
    kw = tiny.inputs("llava", model, [1], seed=55)
    plan = vtprune.Compose(ToDRE(keep=0.25), vtprune.PyramidDrop(layers=[6], ratio=0.25))
    with torch.no_grad(), vtprune.pruned(model, plan):
        model(**kw)
        st = vtprune.stats(model)
    n1 = st.selections["todre-vision"][0].numel()
    n2 = st.selections["todre@4"][0].numel()
    assert st.visual_tokens_per_layer == [n1] * 4 + [n2] * 2 + [int(n1 * 0.25)] * 2
    assert set(st.selections["pdrop@6"][0].tolist()) <= set(st.selections["todre@4"][0].tolist())


def test_importance_start_probes_the_tower_and_isolated_does_not():
    from helpers import count_hooks

    model = tiny.llava()
    before = count_hooks(model.model.vision_tower)
    with vtprune.pruned(model, "todre", init="isolated"):
        assert count_hooks(model.model.vision_tower) == before
    with vtprune.pruned(model, "todre"):
        assert count_hooks(model.model.vision_tower) > before


def test_flops_estimate_sees_the_same_tokens_per_layer_as_a_run():
    """``expected_tokens_per_layer`` (what the FLOPs estimate without a run counts) matches the run."""
    from vtprune.stages import expected_tokens_per_layer

    model = tiny.llava()
    kw = tiny.inputs("llava", model, [1], seed=56)
    with torch.no_grad(), vtprune.pruned(model, "todre", keep=0.25):
        model(**kw)
        st = vtprune.stats(model)
    info = _info(model)
    expected = expected_tokens_per_layer(
        ToDRE(keep=0.25).stages(info), int(st.visual_tokens_in), info.num_layers
    )
    assert st.visual_tokens_per_layer == expected
    assert expected[-1] < expected[0] < st.visual_tokens_in
