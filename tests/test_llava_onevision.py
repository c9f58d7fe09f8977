"""LLaVA-OneVision: token structure read off HF's own packing, tower scores on their tokens, video.

The tiny model (``tiny.llava_onevision``) has 5 x 5-token SigLIP crops and ``anyres_max_2``:
(20, 40) px is a 1 x 2 tile grid kept as is, (40, 40) a 2 x 2 grid downscaled from 10 x 10 to
7 x 7, (60, 60) a 3 x 3 grid downscaled to 7 x 7, (30, 50) unpadded rows then downscaled; a video frame pools
5 x 5 to 3 x 3.
"""

from __future__ import annotations

import pytest
import tiny
import torch
from helpers import greedy, row_alone, uncached_greedy

import vtprune
from vtprune import compat
from vtprune.integrations import adapter_for
from vtprune.integrations.llava_onevision import image_spec, resample_taps, video_spec
from vtprune.runtime.state import state_of_cache

# image size -> (tower crops, rows, cols of the packed tile grid): 1 x 2 and 2 x 1 grids as they
# are, 2 x 2 (10 x 10) and 3 x 3 (15 x 15) downscaled to 7 x 7, 3 x 3 unpadded to 9 x 15 then 5 x 9
GRIDS = {
    (20, 40): (3, 5, 10),
    (40, 20): (3, 10, 5),
    (40, 40): (5, 7, 7),
    (60, 60): (10, 7, 7),
    (30, 50): (10, 5, 9),
}
SIZES = list(GRIDS)
VISION = ["random", "uniform", "hired", "visionzip", "divprune", "cdpruner", "mustdrop", "vscan"]
BATCH = ["iv", "v", "", "i"]  # mixed, video-only, text-only and image-only rows, left padded


@pytest.fixture(scope="module")
def model():
    return tiny.llava_onevision()


def _mix(values: torch.Tensor, taps) -> torch.Tensor:
    """Per token, the tap-weighted sum of per-tower-token ``values`` ``[crops * T, D]``."""
    index, weight = taps
    return (values[index] * weight.unsqueeze(-1)).sum(1)


def test_resample_taps_reproduce_bilinear_interpolation():
    grid = torch.randn(1, 1, 9, 7)
    ri, rw = resample_taps(9, 4)
    ci, cw = resample_taps(7, 5)
    rows = (grid[0, 0][ri] * rw.unsqueeze(-1)).sum(1)  # [4, 7]
    ours = (rows[:, ci] * cw.unsqueeze(0)).sum(-1)  # [4, 5]
    ref = torch.nn.functional.interpolate(grid, size=(4, 5), mode="bilinear")[0, 0]
    torch.testing.assert_close(ours, ref)


@pytest.mark.parametrize("size", SIZES)
def test_image_tokens_match_hf_packing(model, size):
    """The spec's taps over the projected tower tokens give HF's packed features; newlines are
    the learned ``image_newline``; the count is HF's."""
    kw = tiny.inputs("llava_onevision", model, [1], sizes=[size])
    mm = model.model
    with torch.no_grad():
        out = mm.get_image_features(kw["pixel_values"], kw["image_sizes"], return_dict=True)
        packed = out.pooler_output[0]
        n_crops = int(image_spec(model.config, list(size)).crops)
        hidden = mm.vision_tower(kw["pixel_values"][0, :n_crops], output_hidden_states=True).hidden_states[-1]
        projected = mm.multi_modal_projector(hidden).flatten(0, 1)
    spec = image_spec(model.config, list(size))
    assert spec.num_tokens == packed.shape[0]
    newline = torch.zeros(spec.num_tokens, dtype=torch.bool)
    newline[list(spec.newline_offsets)] = True
    torch.testing.assert_close(_mix(projected, spec.taps)[~newline], packed[~newline], rtol=1e-5, atol=1e-5)
    assert torch.equal(packed[newline], mm.image_newline.expand(int(newline.sum()), -1))
    tiles = spec.segments[1]
    assert (spec.crops, tiles.rows, tiles.cols) == GRIDS[size]


def test_video_tokens_match_hf_pooling(model):
    kw = tiny.media_inputs("llava_onevision", ["v", "v"], frames=3)
    mm = model.model
    with torch.no_grad():
        pooled = mm.get_video_features(kw["pixel_values_videos"], return_dict=True).pooler_output
        hidden = mm.vision_tower(kw["pixel_values_videos"][1], output_hidden_states=True).hidden_states[-1]
        projected = mm.multi_modal_projector(hidden).flatten(0, 1)
    spec = video_spec(model.config, 3)
    assert spec.num_tokens == pooled.shape[1] == 3 * 9 + 1 and spec.newline_offsets == (27,)
    torch.testing.assert_close(_mix(projected, spec.taps)[:27], pooled[1, :27], rtol=1e-5, atol=1e-5)
    assert [s.offset for s in spec.segments] == [0, 9, 18]


def _layouts(model, kw, method, **opts):
    with torch.no_grad(), vtprune.pruned(model, method, **opts):
        out = model(**kw)
    state = state_of_cache(compat.output_cache(out))
    return [img for row in state.layouts for img in row]


def test_tower_scores_land_on_their_tokens():
    """The substitute score (attention received from the crop's patches, checked against eager
    attention weights) reaches each token as HF's own packing / pooling moves the tower token
    it came from: HF's ``pack_image_features`` and ``apply_pooling`` run on the score map are
    the reference."""
    model = tiny.llava_onevision(attn="eager")
    kw = tiny.media_inputs("llava_onevision", ["vi"], sizes=[(40, 40)], frames=2, seed=3)
    video, image = _layouts(model, kw, "hired", keep=0.5)
    assert (video.kind, image.kind) == ("video", "image")
    adapter, mm, last = adapter_for(model), model.model, 2
    with torch.no_grad():
        pv = kw["pixel_values"][0, : image.crops]
        att = mm.vision_tower(pv, output_attentions=True).attentions[last]  # [crops, H, T, T]
    received = image.vision[last]["received"]
    torch.testing.assert_close(received, att.mean((1, 2)), rtol=1e-5, atol=1e-6)
    assert float(received.std()) > 0  # the check has teeth: scores differ across tokens
    view = adapter.image_view(image)
    scores = view.cls_scores(last)
    with torch.no_grad():
        (ref,), _ = mm.pack_image_features(
            [received.unsqueeze(-1)],
            kw["image_sizes"],
            image_newline=None,
            vision_aspect_ratio="anyres_max_2",
        )
    torch.testing.assert_close(scores[~image.newline], ref.squeeze(-1), rtol=1e-5, atol=1e-7)
    assert bool(torch.isinf(scores[image.newline]).all())
    vscores = adapter.image_view(video).cls_scores(last)
    vref = mm.apply_pooling(video.vision[last]["received"].unsqueeze(-1)).flatten()
    torch.testing.assert_close(vscores[:-1], vref, rtol=1e-5, atol=1e-7)
    # keys and tower features follow the same map
    keys = view.keys(last)
    ref_keys, _ = mm.pack_image_features(
        [image.vision[last]["keys"]], kw["image_sizes"], None, "anyres_max_2"
    )
    torch.testing.assert_close(keys[~image.newline], ref_keys[0], rtol=1e-5, atol=1e-6)


def test_partitions_are_base_and_tiles_or_frames(model):
    kw = tiny.media_inputs("llava_onevision", ["iv"], sizes=[(40, 20)], frames=3)
    image, video = _layouts(model, kw, "visionzip", keep=0.5)
    adapter = adapter_for(model)
    parts = adapter.image_view(image).partitions()
    assert len(parts) == 3 and all(c.numel() == 0 for _, c in parts)  # base + 2 tiles, no CLS
    assert parts[0][0].tolist() == list(range(25))
    frames = adapter.image_view(video).partitions()
    assert [p.tolist() for p, _ in frames] == [list(range(f * 9, f * 9 + 9)) for f in range(3)]


def test_multi_image_prompt_images_are_base_crops(model):
    """With ``batch_num_images`` > 1 HF encodes each image as its base crop plus one newline."""
    kw = tiny.inputs("llava_onevision", model, [1], sizes=[(40, 40)])
    two = tiny.inputs("llava_onevision", model, [2], sizes=[(40, 40), (20, 40)])
    specs = adapter_for(model).image_specs(dict(two, batch_num_images=torch.tensor([2])))
    assert [s.num_tokens for s in specs] == [26, 26] and specs[0].crops == 1
    ids = torch.cat([kw["input_ids"][:, :3], torch.full((1, 52), tiny.IMAGE), kw["input_ids"][:, -4:]], 1)
    call = dict(two, input_ids=ids, attention_mask=torch.ones_like(ids), batch_num_images=torch.tensor([2]))
    with torch.no_grad():
        ref = model(**call).logits
        with vtprune.pruned(model, "hired", keep=1.0):
            assert torch.equal(model(**call).logits, ref)
        with vtprune.pruned(model, "hired", keep=0.5):
            model(**call)
            assert vtprune.stats(model).visual_tokens_in == 52


@pytest.mark.parametrize(
    "media, methods", [(["ivi"], VISION + ["fastv", "pdrop"]), (BATCH, ["uniform", "hired", "fastv"])]
)
def test_keep_everything_equals_unpruned_with_video(model, media, methods):
    kw = tiny.media_inputs(
        "llava_onevision", media, seed=1, sizes=[(40, 40), (20, 40), (60, 60)][: "".join(media).count("i")]
    )
    with torch.no_grad():
        ref = model(**kw).logits
        for method in methods:
            with vtprune.pruned(model, method, keep=1.0):
                assert torch.equal(model(**kw).logits, ref), method


@pytest.mark.parametrize("method", ["hired", "fastv"])
def test_cached_generate_equals_uncached_pruned_steps_with_video(model, method):
    kw = tiny.media_inputs("llava_onevision", ["ivi"], seed=3, sizes=[(40, 40), (30, 50)])
    with vtprune.pruned(model, method, keep=0.5):
        cached = greedy(model, kw, 4)
        selections = vtprune.stats(model).selections
        reference = uncached_greedy(model, kw, selections, 4)
    assert torch.equal(cached, reference)


@pytest.mark.parametrize("method", ["hired", "visionzip"])
def test_left_padded_mixed_batch_equals_rows_alone(model, method):
    kw = tiny.media_inputs("llava_onevision", BATCH, seed=4, sizes=[(40, 40), (60, 60)])
    with vtprune.pruned(model, method, keep=0.25):
        batch = greedy(model, kw, 4)
        rows = [greedy(model, row_alone("llava_onevision", kw, b, BATCH), 4) for b in range(len(BATCH))]
    assert torch.equal(batch, torch.cat(rows))
