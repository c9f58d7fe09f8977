"""Zero-TPrune on LLaVA-OneVision: each SigLIP crop (base image, tiles) and video frame a row of the
tower batch with its share of the image's (clip's) budget, no CLS; the plain per-crop reference
(eager map, looped PageRank and similarity) on plain, downscaled and pooled tokens, an image and a
video in one prompt, keep within 2%, the tower schedule and the shared tables."""

from __future__ import annotations

import pytest
import tiny
import torch
from helpers import eager_clip_layer, image_runs, shared_tables
from test_flowcut_onevision import plan_targets
from test_zerotprune import loop_crop_step, loop_pagerank
from transformers import LlavaOnevisionForConditionalGeneration

import vtprune
from vtprune.integrations.llava_onevision import LlavaOnevisionAdapter, image_spec, video_spec

TOWER = 8  # features from the last layer (7): the default prunes after tower layer 6
SIZES = [(40, 80), (80, 80)]  # 1 x 2 tiles (10 x 20 cells, one patch a token); 2 x 2 downscaled to 14 x 14


@pytest.fixture(scope="module")
def ov_model():
    torch.manual_seed(0)
    cfg = tiny._onevision_config(40)  # 10 x 10 patches a crop; video frames pool to 5 x 5
    cfg.vision_config.num_hidden_layers = TOWER
    return tiny._finish(LlavaOnevisionForConditionalGeneration(cfg), "sdpa")


def crop_reference(model, pixels, target: int, shown: torch.Tensor, layers: list[int]) -> list[int]:
    """The rule on one SigLIP crop (or frame), the tower run plainly with its full eager attention
    matrices: the map and PageRank over every present patch, the picks among the ``shown`` ones
    (each the heaviest patch of a language-model token); the other patches stay while the crop
    drops none of its shown ones, else they leave."""
    tower = model.model.vision_tower
    vm = getattr(tower, "vision_model", tower)
    h = vm.embeddings(pixels)
    kept = list(range(h.shape[1]))  # every slot a patch: no CLS
    n0 = int(shown.sum())
    for idx, layer in enumerate(vm.encoder.layers[: max(layers) + 1]):
        h, q, k, v, weights = eager_clip_layer(layer, h)  # weights: [1, H, T, T]
        if idx not in layers:
            continue
        scores = loop_pagerank(weights[0].mean(0), 30)
        keys = k[0].mean(0).tolist()
        chosen = loop_crop_step(scores, keys, kept, shown, n0, target, layers.index(idx) + 1, len(layers))
        h = h[:, chosen]
        kept = [kept[i] for i in chosen]
    return kept


def expected_tokens(model, spec, crops: torch.Tensor, keep: float, layers: list[int]) -> torch.Tensor:
    """The image's (clip's) kept language-model tokens by the plain rule: a token is kept iff its
    heaviest patch survived its crop; newlines only when nothing was dropped."""
    per_crop = LlavaOnevisionAdapter(model).tower_tokens_per_crop
    expect = torch.zeros(spec.num_tokens, dtype=torch.bool)
    patch = spec.source >= 0
    for c, target in enumerate(plan_targets(spec, per_crop, keep)):
        mine = patch & (spec.source // per_crop == c)
        shown = torch.zeros(per_crop, dtype=torch.bool)
        shown[spec.source[mine] % per_crop] = True
        cells = {p + c * per_crop for p in crop_reference(model, crops[c : c + 1], target, shown, layers)}
        for t in torch.nonzero(mine).flatten().tolist():
            expect[t] = int(spec.source[t]) in cells
    if bool(expect[patch].all()):
        expect[~patch] = True  # nothing dropped: the newlines stay
    else:
        assert int(expect.sum()) == sum(plan_targets(spec, per_crop, keep))
    return expect


@pytest.mark.parametrize("keep,layers", [(0.3, None), (0.11, [2, 5]), (1.0, [1])])
def test_image_kept_sets_equal_the_plain_reference(ov_model, keep, layers):
    """Two images in two rows: tiles one patch a token, and tiles downscaled (a token mixes up to
    four patches and is kept with its heaviest one)."""
    model = ov_model
    kw = tiny.inputs("llava_onevision", model, [1, 1], seed=7, sizes=SIZES)
    assert bool(((image_spec(model.config, list(SIZES[1])).taps[1] > 0).sum(1) > 1).any())  # mixing
    with torch.no_grad(), vtprune.pruned(model, "zerotprune", keep=keep, layers=layers):
        model(**kw)
        selection = vtprune.stats(model).selections["zerotprune"]
    with torch.no_grad():
        for i, (size, (row, pos)) in enumerate(zip(SIZES, image_runs(kw["input_ids"]))):
            spec = image_spec(model.config, list(size))
            expect = expected_tokens(model, spec, kw["pixel_values"][i], keep, layers or [TOWER - 2])
            assert torch.equal(torch.isin(pos, selection[row].to(pos.device)), expect), i


@pytest.mark.parametrize("keep,layers", [(0.25, None), (0.11, [1, 4])])
def test_an_image_and_a_video_in_one_prompt_equal_the_plain_reference(ov_model, keep, layers):
    """One prompt with a downscaled image then a 4-frame clip (two tower calls): the image's crops
    and the clip's frames each get their own budget, each frame its own map (SigLIP attends within
    a frame); a pooled video token is kept with its heaviest patch."""
    model = ov_model
    kw = tiny.media_inputs("llava_onevision", ["iv"], sizes=[SIZES[1]], frames=4, seed=3, cfg=model.config)
    with torch.no_grad(), vtprune.pruned(model, "zerotprune", keep=keep, layers=layers):
        model(**kw)
        selection = vtprune.stats(model).selections["zerotprune"][0]
    layers = layers or [TOWER - 2]
    ids = kw["input_ids"]
    with torch.no_grad():
        spec = image_spec(model.config, list(SIZES[1]))
        ((_, pos),) = image_runs(ids)
        expect = expected_tokens(model, spec, kw["pixel_values"][0], keep, layers)
        assert torch.equal(torch.isin(pos, selection.to(pos.device)), expect)
        spec = video_spec(model.config, 4)
        ((_, pos),) = image_runs(ids, image_id=tiny.VIDEO)
        expect = expected_tokens(model, spec, kw["pixel_values_videos"][0], keep, layers)
        assert torch.equal(torch.isin(pos, selection.to(pos.device)), expect)


def test_tower_tokens_per_layer(ov_model):
    kw = tiny.inputs("llava_onevision", ov_model, [1], seed=3, sizes=[(80, 80)])  # base + 2 x 2 tiles
    per_crop = LlavaOnevisionAdapter(ov_model).tower_tokens_per_crop
    targets = plan_targets(image_spec(ov_model.config, [80, 80]), per_crop, 0.2)
    with torch.no_grad(), vtprune.pruned(ov_model, "zerotprune", keep=0.2, layers=[1, 4]):
        ov_model(**kw)
        st = vtprune.stats(ov_model)
    tower = st.tower_tokens_per_layer
    assert len(tower) == TOWER and tower[:2] == [5 * per_crop] * 2  # layers 0 and 1 see every patch
    assert tower[2] == tower[4] > tower[5] == tower[7] == sum(targets)  # every crop's share, no CLS
    assert st.visual_tokens_per_layer[0] == sum(targets)  # the newlines left with the drops


def test_video_frames_are_rows_with_their_own_budgets(ov_model):
    kw = tiny.media_inputs("llava_onevision", ["v"], frames=4, seed=2, cfg=ov_model.config)
    per_crop = LlavaOnevisionAdapter(ov_model).tower_tokens_per_crop
    targets = plan_targets(video_spec(ov_model.config, 4), per_crop, 0.25)
    with torch.no_grad(), vtprune.pruned(ov_model, "zerotprune", keep=0.25):
        ov_model(**kw)
        st = vtprune.stats(ov_model)
    assert targets == [6, 7, 6, 6]  # round(0.25 * 101) over four frames of 25 tokens
    assert st.tower_tokens_per_layer[: TOWER - 1] == [4 * per_crop] * (TOWER - 1)
    assert st.tower_tokens_per_layer[-1] == sum(targets)


@pytest.mark.parametrize("keep", [0.5, 0.25, 0.11])
@pytest.mark.parametrize("media", ["plain", "downscaled", "video", "mixed"])
def test_keep_target_within_two_percent(ov_model, keep, media):
    if media == "video":
        kw = tiny.media_inputs("llava_onevision", ["v"], frames=4, seed=1, cfg=ov_model.config)
    elif media == "mixed":  # an image and a clip in one row (two tower calls), an image in the other
        kw = tiny.media_inputs(
            "llava_onevision", ["iv", "i"], sizes=SIZES, frames=4, seed=1, cfg=ov_model.config
        )
    else:
        sizes = [(40, 80), (80, 40)] if media == "plain" else [(80, 80), (120, 120)]
        kw = tiny.inputs("llava_onevision", ov_model, [len(sizes)], seed=1, sizes=sizes)
    with torch.no_grad(), vtprune.pruned(ov_model, "zerotprune", keep=keep, layers=[1, 4]):
        ov_model(**kw)
        got = vtprune.stats(ov_model).keep_ratio
    assert abs(got - keep) / keep <= 0.02, got


def test_composes_with_a_prefill_method():
    model = tiny.llava_onevision()  # 1 x 2 tiles: 25 + 50 patches and 5 newlines, 80 tokens
    kw = tiny.inputs("llava_onevision", model, [1], seed=1, sizes=[(20, 40)])
    plan = vtprune.Compose(vtprune.ZeroTPrune(keep=0.5), vtprune.FastV(layer=2, ratio=0.5))
    with torch.no_grad(), vtprune.pruned(model, plan):
        model(**kw)
        st = vtprune.stats(model)
    assert st.visual_tokens_per_layer == [40, 40] + [20] * (tiny.LAYERS - 2)
    assert st.tower_tokens_per_layer[-1] == 40


def test_several_feature_layers_are_refused_clearly():
    model = tiny.llava_onevision()
    model.config.vision_feature_layer = [-2, -1]
    with pytest.raises(
        NotImplementedError, match="zerotprune prunes inside the vision tower, which needs one"
    ):
        vtprune.apply(model, "zerotprune")
    assert vtprune.api.handle_of(model) is None


# -- the shared equivalence tables ---------------------------------------------------------------
(
    test_nothing_to_drop_equals_unpruned,
    test_remove_restores_the_model,
    test_cached_generate_equals_uncached,
    test_padded_batch_equals_rows_alone,
) = shared_tables("zerotprune", {"llava_onevision": "warm_onevision"}, plan=dict(keep=0.3))


def test_nothing_to_drop_equals_unpruned_on_video(ov_model):
    kw = tiny.media_inputs("llava_onevision", ["vi", "v"], frames=2, seed=6, cfg=ov_model.config)
    with torch.no_grad():
        ref = ov_model(**kw).logits
        with vtprune.pruned(ov_model, "zerotprune", keep=1.0, layers=[1, 4]):
            out = ov_model(**kw).logits
    assert torch.equal(out, ref)
