"""A tower stage composed with vision stages on LLaVA-NeXT, Qwen2.5-VL, Qwen3-VL and LLaVA-OneVision
(images and, where the family has them, videos): nothing to drop is the vision stage alone, the
vision stage chooses among the tower's survivors with ``keep`` relative to them, and the shared
cached / padded-batch tables hold. LLaVA-1.5 and Qwen2-VL: ``test_tower_compose.py``; the scores
the vision stages read: ``test_tower_compose_scores.py``."""

from __future__ import annotations

import pytest
import test_equivalence as eq
import tiny
import torch
from helpers import greedy, row_alone
from test_flowcut_next import next_model  # noqa: F401 (fixtures)
from test_flowcut_onevision import ov_model  # noqa: F401
from test_flowcut_qwen3 import qwen3  # noqa: F401
from test_flowcut_qwen25 import qwen25  # noqa: F401

import vtprune

FIXTURES = {
    "llava_next": "next_model",
    "qwen2_5_vl": "qwen25",
    "qwen3_vl": "qwen3",
    "llava_onevision": "ov_model",
}
FAMILIES = pytest.mark.parametrize("family", sorted(FIXTURES))
# image sizes (LLaVA-NeXT / OneVision: pixels; Qwen: patch grids): crops that unpadding cuts,
# OneVision's anyres_max downscaling (120 x 120), windows of several sizes
SIZES = {
    "llava_next": [(40, 64), (64, 64)],
    "qwen2_5_vl": [(8, 12), (16, 16)],
    "qwen3_vl": [(8, 12), (16, 16)],
    "llava_onevision": [(40, 80), (120, 120)],
}
VIDEO = ("qwen2_5_vl", "qwen3_vl", "llava_onevision")


def model_of(request, family):
    return request.getfixturevalue(FIXTURES[family])


def media(family, model, media_kind: str, seed: int, rows: int = 1) -> dict:
    """``rows`` rows of two images (``"image"``) or of an image and a video (``"video"``)."""
    if media_kind == "image":
        return tiny.inputs(family, model, [2] * rows, seed=seed, sizes=SIZES[family] * rows)
    if family == "llava_onevision":
        return tiny.media_inputs(
            family, ["iv"] * rows, frames=4, seed=seed, cfg=model.config, sizes=[(40, 80)] * rows
        )
    return tiny.media_inputs(family, ["iv"] * rows, frames=2, seed=seed, sizes=SIZES[family] * rows)


CASES = [(f, "image") for f in sorted(FIXTURES)] + [(f, "video") for f in VIDEO]
MEDIA = pytest.mark.parametrize("family,kind", CASES)


def _run(model, plan, kw):
    with torch.no_grad(), vtprune.pruned(model, plan):
        logits = model(**kw).logits
        return logits, vtprune.stats(model)


@MEDIA
@pytest.mark.parametrize("vision", ["divprune", "visionzip"])
def test_nothing_to_drop_in_the_tower_is_the_vision_stage_alone(request, family, kind, vision):
    """FlowCut at keep=1.0 drops nothing: the vision stage then sees the unpruned tower's images and
    picks (and merges) exactly what it picks alone, with the same logits."""
    model = model_of(request, family)
    kw = media(family, model, kind, seed=11)
    cfg = vtprune.config.config_from_name(vision, keep=0.3)
    alone, st_alone = _run(model, cfg, kw)
    both, st = _run(model, vtprune.Compose(vtprune.FlowCut(keep=1.0), cfg), kw)
    assert torch.equal(both, alone)
    for a, b in zip(st.selections[vision], st_alone.selections[vision]):
        assert torch.equal(a, b)


# every vision-stage method on images; the video cases (the same views, frames as segments) take two
SHARE = [
    (f, "image", v)
    for f in sorted(FIXTURES)
    for v in ("divprune", "hired", "visionzip", "cdpruner", "random", "uniform")
]
SHARE += [(f, "video", v) for f in VIDEO for v in ("divprune", "hired")]


@pytest.mark.parametrize("family,kind,vision", SHARE)
def test_the_vision_stage_keeps_its_share_of_the_survivors(request, family, kind, vision):
    """The vision stage keeps only tokens the tower let through, and the layer-averaged count is
    ``keep_tower * keep_vision`` of the visual tokens within 2% (LLaVA-NeXT: FlowCut's layer-1
    prune keeps the same share of its own count)."""
    check_share(model_of(request, family), family, kind, "flowcut", vision)


@pytest.mark.parametrize(
    "family,kind",
    [(f, "image") for f in ("llava_next", "qwen2_5_vl", "qwen3_vl", "llava_onevision")]
    + [(f, "video") for f in ("qwen3_vl", "llava_onevision")],
)
def test_zerotprune_then_a_vision_stage(request, family, kind):
    """The other tower stage, on images and videos."""
    check_share(model_of(request, family), family, kind, "zerotprune", "divprune")


def check_share(model, family, kind, tower, vision):
    kw = media(family, model, kind, seed=12)
    tower_cfg = vtprune.config.config_from_name(tower, keep=0.5)
    cfg = vtprune.config.config_from_name(vision, keep=0.5)
    _, st = _run(model, vtprune.Compose(tower_cfg, cfg), kw)
    _, st_tower = _run(model, tower_cfg, kw)
    for picked, survivors in zip(st.selections[vision], st.selections[tower]):
        assert 0 < picked.numel() < survivors.numel()
        assert bool(torch.isin(picked, survivors).all())
    for a, b in zip(st.selections[tower], st_tower.selections[tower]):
        assert torch.equal(a, b)  # the tower's choice does not depend on what follows it
    assert abs(st_tower.keep_ratio - 0.5) / 0.5 <= 0.02, st_tower.keep_ratio  # the tower alone
    assert abs(st.keep_ratio - 0.25) / 0.25 <= 0.02, st.keep_ratio


PLAN = vtprune.Compose(vtprune.FlowCut(keep=0.3), vtprune.DivPrune(keep=0.5))


@pytest.fixture
def tables(monkeypatch):
    monkeypatch.setitem(eq.PLANS, PLAN, {})


@FAMILIES
def test_cached_generate_equals_uncached(request, tables, family):
    eq.test_cached_generate_equals_uncached_pruned_steps((family, model_of(request, family)), PLAN)


@FAMILIES
def test_padded_batch_equals_rows_alone(request, family):
    """The shared table's check, allowing a row that ends (EOS) early alone: the batch pads it after."""
    model = model_of(request, family)
    images = [1, 2, 0]
    sizes = {"llava_next": [(40, 64), (64, 64), (64, 40)], "llava_onevision": [(40, 80), (80, 40), (40, 40)]}
    sizes = sizes.get(family, [(8, 12), (16, 16), (12, 8)])
    kw = tiny.inputs(family, model, images, side="left", seed=4, sizes=sizes)
    with vtprune.pruned(model, PLAN):
        batch = greedy(model, kw, 4)
        for b in range(len(images)):
            row = greedy(model, row_alone(family, kw, b, images), 4)[0]
            assert batch[b, : row.numel()].tolist() == row.tolist(), b
            assert bool((batch[b, row.numel() :] == tiny.PAD).all()), b


@pytest.mark.parametrize("family", VIDEO)
def test_videos_cached_generate_equals_uncached(request, family):
    """An image and a clip in one prompt: generation with the cache equals recomputing the pruned
    prompt at every step."""
    from helpers import uncached_greedy

    model = model_of(request, family)
    kw = media(family, model, "video", seed=13)
    with vtprune.pruned(model, PLAN):
        cached = greedy(model, kw, 4)
        reference = uncached_greedy(model, kw, vtprune.stats(model).selections, 4)
    assert torch.equal(cached, reference)
