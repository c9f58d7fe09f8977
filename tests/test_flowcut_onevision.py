"""FlowCut on LLaVA-OneVision: SigLIP crops and video frames as tower rows scored by the global
row, survivors through unpadding, ``anyres_max`` downscaling, video pooling and newlines; a plain
per-crop reference, the shared tables, the tower schedule and the accounting."""

from __future__ import annotations

import math

import pytest
import tiny
import torch
from helpers import eager_clip_layer, shared_tables
from transformers import LlavaOnevisionForConditionalGeneration

import vtprune
from vtprune.integrations.llava_onevision import LlavaOnevisionAdapter, image_spec, video_spec

TOWER = 8  # features from the last layer (7): pruning after tower layers 0, 2, 4 and 6


@pytest.fixture(scope="module")
def ov_model():
    torch.manual_seed(0)
    cfg = tiny._onevision_config(40)  # 10 x 10 patches a crop; video frames pool to 5 x 5
    cfg.vision_config.num_hidden_layers = TOWER
    return tiny._finish(LlavaOnevisionForConditionalGeneration(cfg), "sdpa")


def plan_targets(spec, per_crop: int, keep: float) -> list[int]:
    """The patches each crop (frame) keeps: ``round(keep * N)`` of the image's language-model tokens
    (newlines included), split over its crops by the tokens whose heaviest tap each holds."""
    shown = torch.bincount(spec.source[spec.source >= 0] // per_crop, minlength=spec.crops)
    total = int(shown.sum())
    budget = min(total, max(1, math.floor(keep * spec.num_tokens + 0.5)))
    ends = [math.floor(budget * int(c) / total + 0.5) for c in shown.cumsum(0)]
    return [b - a for a, b in zip([0] + ends[:-1], ends)]


def crop_rule(model, pixels: torch.Tensor, target: int):
    """FlowCut's loop on one SigLIP crop, plainly with the full eager attention matrix: the mean
    query's softmax over the keys times the value density, smoothed, the entropy schedule. Every
    patch is shown (no unpadding cut, no resampling). Returns (kept patches, their projected features)."""
    tower = model.model.vision_tower
    vm = getattr(tower, "vision_model", tower)
    h = vm.embeddings(pixels)
    layers = vm.encoder.layers
    select_layer = len(layers) - 1
    kept = torch.arange(h.shape[1])
    cumulative = None
    for idx, layer in enumerate(layers[:select_layer]):
        attn = layer.self_attn
        h, q, k, v, weights = eager_clip_layer(layer, h)  # weights: [1, H, T, T]
        rel = torch.softmax(q.mean(2, keepdim=True) @ k.transpose(-1, -2) * attn.scale, -1).mean(1)[0, 0]
        score = rel * v.mean(1)[0].abs().sum(-1)
        cumulative = score if cumulative is None else 0.5 * cumulative + 0.5 * score
        rpl = select_layer - idx - 1
        if rpl % 2:
            continue
        n = kept.numel()
        if rpl:
            ratio = -torch.xlogy(rel, rel).sum() / math.log(n)
            count = min(max(n - int(((n - target) / rpl**0.5 * (1 - ratio**2)).round()), target), n)
        else:
            count = min(target, n)
        top = cumulative.argsort(descending=True, stable=True)[:count].sort().values
        h, cumulative, kept = h[:, top], cumulative[top], kept[top]
    out = layers[select_layer](h, None)
    h = out[0] if isinstance(out, tuple) else out
    return kept, model.model.multi_modal_projector(h[0])


@pytest.mark.parametrize("keep", [0.3, 0.11])
def test_kept_features_equal_a_plain_per_crop_reference(ov_model, keep):
    """1 x 2 tiles, not downscaled: every token is one tower patch, so the packed features are
    each crop's survivors (the plain rule) at their cells, zeros elsewhere, newlines dropped."""
    model, size = ov_model, (40, 80)
    kw = tiny.inputs("llava_onevision", model, [1], seed=7, sizes=[size])
    per_crop = LlavaOnevisionAdapter(model).tower_tokens_per_crop
    spec = image_spec(model.config, list(size))
    assert bool(((spec.taps[1] > 0).sum(1) <= 1).all())  # one tap a token: nothing mixes
    with torch.no_grad(), vtprune.pruned(model, "flowcut", keep=keep):
        packed = model.model.get_image_features(
            pixel_values=kw["pixel_values"], image_sizes=kw["image_sizes"]
        ).pooler_output[0]
        model(**kw)
        selection = vtprune.stats(model).selections["flowcut"][0]
    expect = torch.zeros_like(packed)
    kept_tokens = torch.zeros(spec.num_tokens, dtype=torch.bool)
    with torch.no_grad():
        for c, target in enumerate(plan_targets(spec, per_crop, keep)):
            kept, feats = crop_rule(model, kw["pixel_values"][0, c : c + 1], target)
            at = {int(p) + c * per_crop: j for j, p in enumerate(kept)}
            for t in torch.nonzero(spec.source >= 0).flatten().tolist():
                j = at.get(int(spec.source[t]))
                if j is not None:
                    expect[t], kept_tokens[t] = feats[j], True
    patches = spec.source >= 0
    torch.testing.assert_close(packed[patches], expect[patches], rtol=1e-4, atol=1e-5)
    pos = torch.nonzero(kw["input_ids"][0] == tiny.IMAGE).flatten()
    assert torch.equal(torch.isin(pos, selection), kept_tokens)  # newlines gone, survivors kept


def test_resampled_tokens_mix_only_their_surviving_taps(ov_model):
    """A downscaled image (2 x 2 tiles, 20 x 20 cells to 14 x 14): a kept token is one whose
    heaviest tap survived, and its feature is the mix of its surviving taps' features with the
    weights renormalised (the features at the tower's output are read back from the unmixed grid)."""
    model, size = ov_model, (80, 80)
    spec = image_spec(model.config, list(size))
    assert spec.segments[1].rows == 14
    kw = tiny.inputs("llava_onevision", model, [1], seed=5, sizes=[size])
    per_crop = LlavaOnevisionAdapter(model).tower_tokens_per_crop
    grids = {}
    with torch.no_grad(), vtprune.pruned(model, "flowcut", keep=0.25):
        # registered after vtprune's projector hook: it sees the survivors back on their grids
        handle = model.model.multi_modal_projector.register_forward_hook(
            lambda m, a, o: grids.setdefault("grid", o.detach())
        )
        try:
            packed = model.model.get_image_features(
                pixel_values=kw["pixel_values"], image_sizes=kw["image_sizes"]
            ).pooler_output[0]
        finally:
            handle.remove()
    grid = grids["grid"].reshape(-1, grids["grid"].shape[-1])  # [crops * per_crop, D], zeros where dropped
    alive = grid.abs().sum(-1) > 0
    idx, w = spec.taps
    patches = spec.source >= 0
    kept = alive[spec.source.clamp(min=0)] & patches
    weight = w * alive[idx]
    expect = (weight[..., None] * grid[idx]).sum(1) / weight.sum(1, keepdim=True).clamp_min(1e-30)
    mixed = kept & ((w > 0) & ~alive[idx]).any(1)
    assert mixed.any() and kept.sum() == sum(plan_targets(spec, per_crop, 0.25))
    torch.testing.assert_close(packed[kept], expect[kept], rtol=1e-4, atol=1e-5)


def test_tower_tokens_fall_as_planned(ov_model):
    model = ov_model
    kw = tiny.inputs("llava_onevision", model, [1], seed=3, sizes=[(80, 80)])  # base + 2 x 2 tiles
    per_crop = LlavaOnevisionAdapter(model).tower_tokens_per_crop
    targets = plan_targets(image_spec(model.config, [80, 80]), per_crop, 0.2)
    with torch.no_grad(), vtprune.pruned(model, "flowcut", keep=0.2):
        model(**kw)
        st = vtprune.stats(model)
    tower = st.tower_tokens_per_layer
    assert len(tower) == TOWER and tower[0] == 5 * per_crop  # layer 0 sees every patch
    assert all(a >= b for a, b in zip(tower, tower[1:]))  # drops after layers 0, 2, 4 and 6 only
    assert tower[1] == tower[2] and tower[3] == tower[4] and tower[5] == tower[6]
    assert tower[7] == sum(targets)  # every crop's target, no CLS
    assert st.visual_tokens_per_layer[0] == sum(targets)  # the newlines left with the drops


@pytest.mark.parametrize("keep", [0.5, 0.25, 0.11])
@pytest.mark.parametrize("media", ["plain", "downscaled", "video", "mixed"])
def test_keep_target_within_two_percent(ov_model, keep, media):
    if media == "video":
        kw = tiny.media_inputs("llava_onevision", ["v"], frames=4, seed=1, cfg=ov_model.config)
    elif media == "mixed":  # an image and a clip in one row (two tower calls), an image in the other
        sizes = [(40, 80), (80, 80)]
        kw = tiny.media_inputs(
            "llava_onevision", ["iv", "i"], sizes=sizes, frames=4, seed=1, cfg=ov_model.config
        )
    else:
        sizes = [(40, 80), (80, 40)] if media == "plain" else [(80, 80), (120, 120)]
        kw = tiny.inputs("llava_onevision", ov_model, [len(sizes)], seed=1, sizes=sizes)
    with torch.no_grad(), vtprune.pruned(ov_model, "flowcut", keep=keep):
        ov_model(**kw)
        got = vtprune.stats(ov_model).keep_ratio
    assert abs(got - keep) / keep <= 0.02, got


def test_video_frames_are_rows_with_their_own_budgets(ov_model):
    kw = tiny.media_inputs("llava_onevision", ["v"], frames=4, seed=2, cfg=ov_model.config)
    spec = video_spec(ov_model.config, 4)
    per_crop = LlavaOnevisionAdapter(ov_model).tower_tokens_per_crop
    with torch.no_grad(), vtprune.pruned(ov_model, "flowcut", keep=0.25):
        ov_model(**kw)
        st = vtprune.stats(ov_model)
    assert st.tower_tokens_per_layer[0] == 4 * per_crop
    assert st.tower_tokens_per_layer[-1] == sum(plan_targets(spec, per_crop, 0.25)) == 25


def test_composes_with_a_prefill_method():
    model = tiny.llava_onevision()  # 1 x 2 tiles: 25 + 50 patches and 5 newlines, 80 tokens
    kw = tiny.inputs("llava_onevision", model, [1], seed=1, sizes=[(20, 40)])
    plan = vtprune.Compose(vtprune.FlowCut(keep=0.5), vtprune.FastV(layer=2, ratio=0.5))
    with torch.no_grad(), vtprune.pruned(model, plan):
        model(**kw)
        st = vtprune.stats(model)
    assert st.visual_tokens_per_layer == [40, 40] + [20] * (tiny.LAYERS - 2)
    assert st.tower_tokens_per_layer[-1] == 40


# -- the shared equivalence tables ---------------------------------------------------------------
(
    test_nothing_to_drop_equals_unpruned,
    test_remove_restores_the_model,
    test_cached_generate_equals_uncached,
    test_padded_batch_equals_rows_alone,
) = shared_tables("flowcut", {"llava_onevision": "warm_onevision"}, plan=dict(keep=0.3))


def test_nothing_to_drop_equals_unpruned_on_video(ov_model):
    kw = tiny.media_inputs("llava_onevision", ["vi", "v"], frames=2, seed=6, cfg=ov_model.config)
    with torch.no_grad():
        ref = ov_model(**kw).logits
        with vtprune.pruned(ov_model, "flowcut", keep=1.0):
            out = ov_model(**kw).logits
    assert torch.equal(out, ref)


def test_tower_methods_without_a_onevision_rule_are_refused():
    """flowcut and zerotprune have rules for these crops; a tower method written for CLS or merge
    units only would be refused by name."""
    adapter = LlavaOnevisionAdapter(tiny.llava_onevision())
    for method in ("flowcut", "zerotprune"):
        adapter.check_tower_stage(method)
    with pytest.raises(
        NotImplementedError, match="newtower prunes inside the vision tower.*not on llava_onevision"
    ):
        adapter.check_tower_stage("newtower")
