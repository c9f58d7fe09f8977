"""Videos and prompts mixing images and videos on Qwen2-VL, Qwen2.5-VL, Qwen3-VL (and LLaVA-OneVision for
layerskip and mustdrop; its other video checks are in test_llava_onevision.py) (issue 13, item 4).

HF scatters image features into the image placeholders and video features into the video
placeholders separately, and runs the tower once per kind; these tests interleave the two.
"""

from __future__ import annotations

import pytest
import tiny
import torch
from helpers import greedy, row_alone, uncached_greedy

import vtprune
from vtprune.integrations import adapter_for
from vtprune.methods.layerskip import CutStage

VISION = ["random", "uniform", "hired", "visionzip", "divprune", "cdpruner", "todre", "sparsevlm"]
BATCH = ["iv", "v", "", "i"]  # image-only, video-only, text-only and mixed rows, left padded


@pytest.fixture(scope="module", params=tiny.QWEN)
def family_model(request):
    return request.param, tiny.BUILDERS[request.param]()


def test_layouts_carry_kind_and_frames(family_model):
    family, model = family_model
    kw = tiny.media_inputs(family, ["ivi"], sizes=[(8, 8), (4, 8), (8, 4)])
    ad = adapter_for(model)
    specs = ad.image_specs(kw)
    (row,) = ad.layouts(kw["input_ids"], specs)
    got = [(img.kind, img.frames, img.num_tokens) for img in row]
    assert got == [("image", 1, 16), ("video", 2, 16), ("image", 1, 8)]
    ids = kw["input_ids"][0]
    placeholders = [tiny.IMAGE, tiny.VIDEO, tiny.IMAGE]
    assert all(bool((ids[img.positions] == tid).all()) for img, tid in zip(row, placeholders))
    assert [s.offset for s in row[1].segments] == [0, 8]


@pytest.mark.parametrize(
    "media, methods", [(["ivi"], VISION + ["fastv", "pdrop"]), (BATCH, ["uniform", "hired", "fastv"])]
)
def test_keep_everything_equals_unpruned(family_model, media, methods):
    family, model = family_model
    kw = tiny.media_inputs(family, media, seed=1)
    with torch.no_grad():
        ref = model(**kw).logits
        for method in methods:
            with vtprune.pruned(model, method, keep=1.0):
                assert torch.equal(model(**kw).logits, ref), method


@pytest.mark.parametrize("method", ["hired", "fastv", "cdpruner", "todre", "sparsevlm"])
def test_cached_generate_equals_uncached_pruned_steps(family_model, method):
    family, model = family_model
    kw = tiny.media_inputs(family, ["ivi"], seed=3)
    with vtprune.pruned(model, method, keep=0.5):
        cached = greedy(model, kw, 4)
        selections = vtprune.stats(model).selections
        assert selections
        reference = uncached_greedy(model, kw, selections, 4)
    assert torch.equal(cached, reference)


def test_left_padded_mixed_batch_equals_rows_alone(family_model):
    family, model = family_model
    kw = tiny.media_inputs(family, BATCH, seed=4)
    with vtprune.pruned(model, "uniform", keep=0.25):
        batch = greedy(model, kw, 4)
        rows = [greedy(model, row_alone(family, kw, b, BATCH), 4) for b in range(len(BATCH))]
    assert torch.equal(batch, torch.cat(rows))


def test_tower_scores_land_on_their_media(family_model):
    """A video and an image of the same token count, video first in the prompt: HiRED's picks on
    each equal its picks when it is the prompt's only medium (so the video's come from the video's
    tower run, not the image's)."""
    family, model = family_model
    sizes = [(4, 8), (8, 8)]  # 2 frames x 2 x 4 tokens = 16 = 4 x 4 tokens
    kw = tiny.media_inputs(family, ["vi"], seed=5, sizes=sizes)

    def kept(call):
        with torch.no_grad(), vtprune.pruned(model, "hired", keep=0.25):
            model(**call)
            (pos,) = vtprune.stats(model).selections["hired"]
        ids = call["input_ids"][0]
        out = {}
        for kind, tid in (("v", tiny.VIDEO), ("i", tiny.IMAGE)):
            where = torch.nonzero(ids == tid).flatten()
            if where.numel():
                out[kind] = [int(p) - int(where[0]) for p in pos.cpu() if ids[p] == tid]
        return out

    both = kept(kw)
    video = tiny.media_inputs(family, ["v"], sizes=sizes[:1])
    video.update(pixel_values_videos=kw["pixel_values_videos"])
    image = tiny.media_inputs(family, ["i"], sizes=sizes[1:])
    image.update(pixel_values=kw["pixel_values"])
    assert both["v"] == kept(video)["v"] and both["i"] == kept(image)["i"]
    assert len(both["v"]) == len(both["i"]) == 4


@pytest.mark.parametrize("media", [["v"], ["ivi", "v"]])
def test_keep_is_met_on_videos(family_model, media):
    family, model = family_model
    if family == "qwen2_5_vl" and media == ["v"]:
        pytest.skip("video-only keep: Qwen2-VL's run covers it (same layout code); keeps the file short")
    kw = tiny.media_inputs(family, media, seed=6)
    for method in VISION + ["fastv", "pdrop"]:
        with torch.no_grad(), vtprune.pruned(model, method, keep=0.25):
            model(**kw)
            ratio = vtprune.stats(model).keep_ratio
        assert abs(ratio - 0.25) < 0.02, (method, ratio)


# layerskip and mustdrop act beside the vision stages (a cut, thin FFNs, spatial merges, a decode
# stage): their plans must count video tokens as visual and keep the equivalences on video prompts.
SKIP_MERGE_PLANS = {
    "layerskip": dict(keep=0.5, thin_ffn=True),
    "mustdrop": dict(keep=0.4, decode=False),
}
SKIP_MERGE_KEEP_ALL = {
    "layerskip": dict(keep=1.0, thin_ffn=True, ffn_ratio=1),
    "mustdrop": dict(keep=1.0),
}
ONEVISION_SIZES = [(40, 40), (30, 50)]  # a 2 x 2 anyres grid and an unpadded one


@pytest.fixture(scope="module", params=tiny.QWEN + ("llava_onevision",))
def video_model(request):
    return request.param, tiny.BUILDERS[request.param]()


def _media(family: str, media: list[str], seed: int) -> dict:
    sizes = ONEVISION_SIZES[: "".join(media).count("i")] if family == "llava_onevision" else None
    return tiny.media_inputs(family, media, seed=seed, sizes=sizes)


@pytest.mark.parametrize("method", sorted(SKIP_MERGE_KEEP_ALL))
def test_skip_and_merge_keep_everything_equals_unpruned_on_video(video_model, method):
    family, model = video_model
    kw = _media(family, BATCH, 7)
    with torch.no_grad():
        ref = model(**kw).logits
        with vtprune.pruned(model, method, **SKIP_MERGE_KEEP_ALL[method]):
            assert torch.equal(model(**kw).logits, ref)


@pytest.mark.parametrize("method", sorted(SKIP_MERGE_PLANS))
def test_skip_and_merge_cached_equals_uncached_on_video(video_model, method):
    family, model = video_model
    kw = _media(family, ["ivi"], 8)
    with vtprune.pruned(model, method, **SKIP_MERGE_PLANS[method]):
        cached = greedy(model, kw, 4)
        reference = uncached_greedy(model, kw, vtprune.stats(model).selections, 4)
    assert torch.equal(cached, reference)


@pytest.mark.parametrize("method", sorted(SKIP_MERGE_PLANS))
def test_skip_and_merge_padded_video_batch_equals_rows(video_model, method):
    family, model = video_model
    kw = _media(family, BATCH, 9)
    with vtprune.pruned(model, method, **SKIP_MERGE_PLANS[method]):
        batch = greedy(model, kw, 3)
        rows = [greedy(model, row_alone(family, kw, b, BATCH), 3) for b in range(len(BATCH))]
    assert torch.equal(batch, torch.cat(rows))


def test_layerskip_cut_removes_video_tokens(video_model):
    """After the cut layer no visual token is left, video tokens included (a video-only prompt)."""
    family, model = video_model
    kw = _media(family, ["v"], 10)
    n_layers = model.config.get_text_config().num_hidden_layers
    with torch.no_grad(), vtprune.pruned(model, "layerskip", keep=0.5) as handle:
        model(**kw)
        per_layer = vtprune.stats(model).visual_tokens_per_layer
        (cut,) = [stage.layer for stage in handle.stages if isinstance(stage, CutStage)]
    n_video = int((kw["input_ids"] == tiny.VIDEO).sum())
    assert per_layer[0] == n_video > 0
    assert per_layer[cut:] == [0.0] * (n_layers - cut)


def test_mustdrop_keep_is_met_on_video(video_model):
    family, model = video_model
    kw = _media(family, ["ivi", "v"], 11)
    with torch.no_grad(), vtprune.pruned(model, "mustdrop", keep=0.25, decode=False):
        model(**kw)
        ratio = vtprune.stats(model).keep_ratio
    assert abs(ratio - 0.25) < 0.02, ratio
