"""The `temporal` method (the EVS rule) and the per-frame video budget (`video_budget="frame"`)
on Qwen2-VL / Qwen2.5-VL videos, alone and mixed with images and text-only rows."""

from __future__ import annotations

import math

import pytest
import tiny
import torch
from helpers import count_hooks, greedy, row_alone, shared_tables, uncached_greedy

import vtprune

BATCH = ["v", "i", "", "vi"]  # video-only, image-only, text-only and mixed rows, left padded
FRAME_METHODS = ["divprune", "random", "hired"]


@pytest.fixture(scope="module", params=tiny.QWEN)
def family_model(request):
    return request.param, tiny.BUILDERS[request.param]()


def run(model, kw, method, **options):
    """Kept positions per row of one pruned forward, and the LM's unpruned input embeddings."""
    seen = {}

    def grab(module, args, kwargs):
        seen.setdefault("x", kwargs["inputs_embeds"])

    hook = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad(), vtprune.pruned(model, method, **options):
            model(**kw)  # the hook was registered first: it sees the unpruned inputs
            stats = vtprune.stats(model)
    finally:
        hook.remove()
    return stats.selections[method], seen["x"], stats.keep_ratio


def plain_rule(x: torch.Tensor, frames: int, k: int) -> list[int]:
    """The temporal rule written out: score every token, cell by cell and frame by frame, by
    1 - cosine to the same cell of the previous frame (first frame: above everything), and keep
    the k best (ties: the earlier token)."""
    cells = x.shape[0] // frames
    scored = []
    for f in range(frames):
        for c in range(cells):
            i = f * cells + c
            if f == 0:
                scored.append((math.inf, i))
                continue
            a, b = x[i].double(), x[i - cells].double()
            scored.append((1 - float(a @ b / (a.norm() * b.norm())), i))
    scored.sort(key=lambda t: (-t[0], t[1]))
    return sorted(i for _, i in scored[:k])


def video_positions(kw, row=0) -> torch.Tensor:
    return torch.nonzero(kw["input_ids"][row] == tiny.VIDEO).flatten()


@pytest.mark.parametrize("keep", [0.6, 0.3])
def test_kept_set_equals_the_plain_rule(family_model, keep):
    family, model = family_model
    kw = tiny.media_inputs(family, ["v"], seed=21, frames=4)
    (kept,), x, _ = run(model, kw, "temporal", keep=keep)
    pos = video_positions(kw)
    k = int(keep * pos.numel() + 0.5)
    assert k > pos.numel() // 4  # above one frame: the ranking decides
    expected = pos[plain_rule(x[0, pos], 4, k)]
    assert kept.cpu().tolist() == expected.tolist()


def test_repeated_frames_are_dropped(family_model):
    """Frames A A B B B (the tower attends within a frame, so a copied frame gives the same
    tokens): at keep 2/5 exactly the first A and the first B stay."""
    family, model = family_model
    kw = tiny.media_inputs(family, ["v"], seed=22, frames=5)
    pv = kw["pixel_values_videos"].view(5, -1, kw["pixel_values_videos"].shape[-1])
    pv[1], pv[3], pv[4] = pv[0], pv[2], pv[2]
    (kept,), _, _ = run(model, kw, "temporal", keep=0.4)
    pos = video_positions(kw)
    t = pos.numel() // 5
    assert kept.cpu().tolist() == torch.cat([pos[:t], pos[2 * t : 3 * t]]).tolist()


def test_budget_below_one_frame_is_the_first_frames_lattice(family_model):
    family, model = family_model
    kw = tiny.media_inputs(family, ["v"], seed=23, frames=4)
    (kept,), _, _ = run(model, kw, "temporal", keep=0.1)
    one = tiny.media_inputs(family, ["v"], seed=23, frames=1)
    (lattice,), _, _ = run(model, one, "uniform", keep=0.4)  # the same count on one frame
    pos = video_positions(kw)
    assert kept.numel() == int(0.1 * pos.numel() + 0.5) == lattice.numel()
    assert (kept.cpu() - pos[0]).tolist() == (lattice.cpu() - video_positions(one)[0]).tolist()


@pytest.mark.parametrize("frames", [2, 3, 5, 8])
def test_keep_is_met_on_videos_of_several_lengths(frames):
    model = tiny.BUILDERS["qwen2_vl"]()
    kw = tiny.media_inputs("qwen2_vl", ["v", "ivi"], seed=24, frames=frames, sizes=[(16, 16)] * 4)
    for keep in (0.5, 0.25, 0.11):
        _, _, ratio = run(model, kw, "temporal", keep=keep)
        assert abs(ratio - keep) / keep <= 0.02, (frames, keep, ratio)


def test_images_fall_back_to_the_uniform_lattice(family_model):
    family, model = family_model
    kw = tiny.media_inputs(family, ["ii"], seed=25)
    assert (
        run(model, kw, "temporal", keep=0.3)[0][0].tolist()
        == run(model, kw, "uniform", keep=0.3)[0][0].tolist()
    )


@pytest.mark.parametrize("method", FRAME_METHODS)
def test_frame_budget_keeps_the_same_count_in_every_frame(family_model, method):
    family, model = family_model
    kw = tiny.media_inputs(family, ["ivi"], seed=26, frames=4)
    (kept,), _, _ = run(model, kw, method, keep=0.3, video_budget="frame")
    pos = video_positions(kw)
    t = pos.numel() // 4
    counts = [int(torch.isin(kept.cpu(), pos[f * t : (f + 1) * t]).sum()) for f in range(4)]
    assert max(counts) - min(counts) <= 1 and counts[0] == int(0.3 * t + 0.5), counts
    # the images of the prompt keep their own budgets, as with one budget over the clip
    clip = run(model, kw, method, keep=0.3)[0][0].cpu()
    frame = kept.cpu()
    assert frame[~torch.isin(frame, pos)].tolist() == clip[~torch.isin(clip, pos)].tolist()


def test_clip_is_the_default(family_model):
    family, model = family_model
    kw = tiny.media_inputs(family, ["v"], seed=27, frames=4)
    for method in FRAME_METHODS:
        default = run(model, kw, method, keep=0.3)[0][0]
        assert default.tolist() == run(model, kw, method, keep=0.3, video_budget="clip")[0][0].tolist()


@pytest.mark.parametrize(
    "method, options",
    [("temporal", {}), ("divprune", {"video_budget": "frame"}), ("hired", {"video_budget": "frame"})],
)
def test_keep_everything_equals_unpruned_on_mixed_prompts(family_model, method, options):
    family, model = family_model
    kw = tiny.media_inputs(family, ["ivi", "v"], seed=28, frames=3)
    with torch.no_grad():
        ref = model(**kw).logits
        with vtprune.pruned(model, method, keep=1.0, **options):
            assert torch.equal(model(**kw).logits, ref)


@pytest.mark.parametrize("method, options", [("temporal", {}), ("divprune", {"video_budget": "frame"})])
def test_padded_batch_of_video_image_and_text_rows_equals_rows_alone(family_model, method, options):
    family, model = family_model
    kw = tiny.media_inputs(family, BATCH, seed=29, frames=3)
    with vtprune.pruned(model, method, keep=0.3, **options):
        batch = greedy(model, kw, 4)
        rows = [greedy(model, row_alone(family, kw, b, BATCH), 4) for b in range(len(BATCH))]
    assert torch.equal(batch, torch.cat(rows))


def test_frame_budget_is_refused_unless_clip_or_frame():
    with pytest.raises(
        ValueError, match="divprune: option 'video_budget'='tubelet' is invalid; allowed: 'clip', 'frame'"
    ):
        vtprune.DivPrune(keep=0.3, video_budget="tubelet")
    with pytest.raises(TypeError):
        vtprune.Temporal(keep=0.3, video_budget="frame")  # temporal ranks over the clip: no option


def test_composes_with_fastv_and_counts_match_the_flops_estimate():
    """temporal before the LLM, then FastV at layer 2: FastV ranks only what temporal kept, and
    the tokens per layer are what the FLOPs estimate (no run) expects for this clip."""
    from vtprune.config import ModelInfo
    from vtprune.stages import expected_tokens_per_layer

    model = tiny.BUILDERS["qwen2_vl"]()
    kw = tiny.media_inputs("qwen2_vl", ["v"], seed=30, frames=4)
    alone = run(model, kw, "temporal", keep=0.5)[0][0]
    plan = vtprune.Compose(vtprune.Temporal(keep=0.5), vtprune.FastV(layer=2, ratio=0.5))
    with torch.no_grad(), vtprune.pruned(model, plan):
        model(**kw)
        st = vtprune.stats(model)
    assert st.selections["temporal"][0].tolist() == alone.tolist()
    (fastv,) = [v for k, v in st.selections.items() if k.startswith("fastv")]
    assert set(fastv[0].tolist()) < set(alone.tolist())
    info = ModelInfo(num_layers=len(model.model.language_model.layers), family="qwen2_vl")
    stages = [stage for cfg in plan.configs for stage in cfg.stages(info)]
    expected = expected_tokens_per_layer(stages, int(st.visual_tokens_in), info.num_layers)
    assert st.visual_tokens_per_layer == expected


@pytest.mark.parametrize(
    "method, stage",
    [
        ("uniform", "uniform"),
        ("visionzip", "visionzip"),
        ("cdpruner", "cdpruner"),
        ("mustdrop", "mustdrop-vision"),
        ("todre", "todre-vision"),
    ],
)
def test_every_other_image_vision_method_takes_the_frame_budget(method, stage):
    """The option lives in the shared vision-stage loop: the other methods' vision stages (merges
    and later prefill stages included) also keep one count per frame."""
    model = tiny.BUILDERS["qwen2_vl"]()
    kw = tiny.media_inputs("qwen2_vl", ["ivi"], seed=31, frames=4)
    with torch.no_grad(), vtprune.pruned(model, method, keep=0.3, video_budget="frame"):
        model(**kw)
        kept = vtprune.stats(model).selections[stage][0].cpu()
    pos = video_positions(kw)
    t = pos.numel() // 4
    counts = [int(torch.isin(kept, pos[f * t : (f + 1) * t]).sum()) for f in range(4)]
    assert len(set(counts)) == 1 and 0 < counts[0] <= t, counts


# ---- min_per_frame (our addition): a guaranteed floor per frame ------------------------------

FLOOR_FAMILIES = ("qwen2_vl", "llava_onevision")
ONEVISION_SIZES = [(40, 40), (30, 50)]  # a 2 x 2 anyres grid and an unpadded one


@pytest.fixture(scope="module", params=FLOOR_FAMILIES)
def floor_model(request):
    return request.param, tiny.BUILDERS[request.param]()


def floor_media(family: str, media: list[str], seed: int, frames: int = 4) -> dict:
    sizes = ONEVISION_SIZES[: "".join(media).count("i")] if family == "llava_onevision" else None
    return tiny.media_inputs(family, media, seed=seed, frames=frames, sizes=sizes)


def frame_grid(family: str, kw: dict, frames: int) -> tuple[torch.Tensor, int, int]:
    """The video's grid positions (LLaVA-OneVision's closing newline left off), the cells per
    frame and the frame grid's width."""
    pos = video_positions(kw)
    tail = 1 if family == "llava_onevision" else 0
    grid = pos[: pos.numel() - tail]
    cells = grid.numel() // frames
    return grid, cells, math.isqrt(cells)  # the tiny models' video frames are square


def plain_floor_rule(
    x: torch.Tensor, frames: int, budget: int, share: float, tail: int, cols: int
) -> list[int]:
    """The rule with ``min_per_frame=share`` written out over the video's tokens ``x`` (grid, then
    ``tail`` closing newlines): every later frame first takes its ``floor(share * B / F)`` most
    dissimilar cells, the first frame then takes what is left up to all of it (a partial first
    frame: the ``uniform`` lattice), and the rest of the later tokens go by the global ranking."""
    from fractions import Fraction

    from vtprune.selection import strided_grid

    cells = (x.shape[0] - tail) // frames
    keep_tail = budget > cells
    b = budget - tail if keep_tail else budget
    floor = min(cells, math.floor(Fraction(str(share)) * b / frames))  # exact, no float error
    score = {}
    for f in range(1, frames):
        for c in range(cells):
            i = f * cells + c
            a, p = x[i].double(), x[i - cells].double()
            score[i] = 1 - float(a @ p / (a.norm() * p.norm()))
    kept = []
    for f in range(1, frames):
        mine = sorted(range(f * cells, (f + 1) * cells), key=lambda i: (-score[i], i))
        kept += mine[:floor]
    n_first = min(cells, b - (frames - 1) * floor)
    if n_first == cells:
        kept += list(range(cells))
    else:
        kept += strided_grid(cells // cols, cols, n_first).tolist()
    rest = sorted((i for i in score if i not in kept), key=lambda i: (-score[i], i))
    kept += rest[: b - len(kept)]
    if keep_tail:
        kept += list(range(frames * cells, x.shape[0]))
    assert len(kept) == len(set(kept)) == budget
    return sorted(kept)


@pytest.mark.parametrize("keep", [0.6, 0.3, 0.1])
def test_min_per_frame_zero_is_the_evs_rule(floor_model, keep):
    family, model = floor_model
    kw = floor_media(family, ["v"], seed=40)
    (zero,), x, _ = run(model, kw, "temporal", keep=keep, min_per_frame=0.0)
    (default,), _, _ = run(model, kw, "temporal", keep=keep)
    assert zero.tolist() == default.tolist()
    pos = video_positions(kw)
    if family != "llava_onevision" and keep > 0.25:  # above one frame: the plain EVS reference
        k = int(keep * pos.numel() + 0.5)
        assert zero.cpu().tolist() == pos[plain_rule(x[0, pos], 4, k)].tolist()
    # the plain floor rule with share 0 is the EVS rule too (first frame's lattice below one frame)
    grid, _, cols = frame_grid(family, kw, 4)
    tail = pos.numel() - grid.numel()
    k = int(keep * pos.numel() + 0.5)
    assert zero.cpu().tolist() == pos[plain_floor_rule(x[0, pos], 4, k, 0.0, tail, cols)].tolist()


@pytest.mark.parametrize(
    "keep, share", [(0.6, 0.5), (0.6, 1.0), (0.3, 1.0), (0.3, 0.5), (0.1, 1.0), (0.45, 0.7)]
)
def test_kept_set_equals_the_plain_floor_rule(floor_model, keep, share):
    family, model = floor_model
    kw = floor_media(family, ["v"], seed=41, frames=4)
    (kept,), x, _ = run(model, kw, "temporal", keep=keep, min_per_frame=share)
    pos = video_positions(kw)
    grid, _, cols = frame_grid(family, kw, 4)
    k = int(keep * pos.numel() + 0.5)
    expected = pos[plain_floor_rule(x[0, pos], 4, k, share, pos.numel() - grid.numel(), cols)]
    assert kept.cpu().tolist() == expected.tolist()
    assert kept.numel() == k


@pytest.mark.parametrize("keep", [0.25, 0.3, 0.11])
def test_every_frame_of_a_static_clip_keeps_its_fair_share(floor_model, keep):
    """A clip of one frame repeated: the EVS rule spends a quarter of 4 frames on the first frame
    alone; with min_per_frame=1 every frame keeps floor(budget / frames) or more."""
    family, model = floor_model
    kw = floor_media(family, ["v"], seed=42, frames=4)
    if family == "llava_onevision":
        kw["pixel_values_videos"][:, 1:] = kw["pixel_values_videos"][:, :1]
    else:
        pv = kw["pixel_values_videos"].view(4, -1, kw["pixel_values_videos"].shape[-1])
        pv[1:] = pv[0]
    grid, cells, _ = frame_grid(family, kw, 4)
    pos = video_positions(kw)
    budget = int(keep * pos.numel() + 0.5)
    frame_budget = budget - (pos.numel() - grid.numel() if budget > cells else 0)

    def counts(kept):
        return [int(torch.isin(kept.cpu(), grid[f * cells : (f + 1) * cells]).sum()) for f in range(4)]

    evs = counts(run(model, kw, "temporal", keep=keep)[0][0])
    assert sum(evs[1:]) == max(0, frame_budget - cells)  # the collapse: later frames get the excess only
    floor = counts(run(model, kw, "temporal", keep=keep, min_per_frame=1.0)[0][0])
    assert min(floor) >= frame_budget // 4 > 0 and sum(floor) == sum(evs), (evs, floor)
    assert floor[1:] == [frame_budget // 4] * 3  # a static later frame gets no more than its floor


@pytest.mark.parametrize(
    "family, frames",
    [("qwen2_vl", 2), ("qwen2_vl", 3), ("qwen2_vl", 8), ("llava_onevision", 8), ("llava_onevision", 16)],
)
def test_keep_is_met_with_a_floor(family, frames):
    """The floors come out of the clip's budget: the kept count is the EVS rule's, so ``keep`` is
    met as well (a OneVision frame is 9 tokens: shorter clips round by more than 2% per video, with
    or without a floor)."""
    model = tiny.BUILDERS[family]()
    sizes = [(16, 16)] * 4 if family == "qwen2_vl" else ONEVISION_SIZES  # per medium / per image
    kw = tiny.media_inputs(family, ["v", "ivi"], seed=43, frames=frames, sizes=sizes)
    for keep in (0.5, 0.25, 0.11):
        evs = run(model, kw, "temporal", keep=keep)[2]
        for share in (0.5, 1.0):
            ratio = run(model, kw, "temporal", keep=keep, min_per_frame=share)[2]
            assert ratio == evs and abs(ratio - keep) / keep <= 0.02, (frames, share, keep, ratio)


def test_images_ignore_the_floor(floor_model):
    family, model = floor_model
    kw = floor_media(family, ["ii"], seed=44)
    assert (
        run(model, kw, "temporal", keep=0.3, min_per_frame=1.0)[0][0].tolist()
        == run(model, kw, "uniform", keep=0.3)[0][0].tolist()
    )


def test_min_per_frame_is_checked():
    for bad in (-0.1, 1.5, "half", True, None):
        with pytest.raises(
            ValueError, match=rf"temporal: option 'min_per_frame'={bad!r} is invalid; allowed"
        ):
            vtprune.Temporal(keep=0.25, min_per_frame=bad)


# the shared tables with a floor, on videos (mixed with images and text rows) and on images
def test_floor_keep_everything_equals_unpruned(floor_model):
    family, model = floor_model
    kw = floor_media(family, ["ivi", "v"], seed=45, frames=3)
    with torch.no_grad():
        ref = model(**kw).logits
        with vtprune.pruned(model, "temporal", keep=1.0, min_per_frame=1.0):
            assert torch.equal(model(**kw).logits, ref)


def test_floor_cached_generate_equals_uncached(floor_model):
    family, model = floor_model
    kw = floor_media(family, ["ivi"], seed=46)
    with vtprune.pruned(model, "temporal", keep=0.3, min_per_frame=1.0):
        cached = greedy(model, kw, 4)
        reference = uncached_greedy(model, kw, vtprune.stats(model).selections, 4)
    assert torch.equal(cached, reference)


def test_floor_padded_batch_equals_rows_alone(floor_model):
    family, model = floor_model
    kw = floor_media(family, BATCH, seed=47, frames=3)
    with vtprune.pruned(model, "temporal", keep=0.3, min_per_frame=1.0):
        batch = greedy(model, kw, 4)
        rows = [greedy(model, row_alone(family, kw, b, BATCH), 4) for b in range(len(BATCH))]
    assert torch.equal(batch, torch.cat(rows))


def test_floor_remove_restores_the_model(floor_model):
    family, model = floor_model
    kw = floor_media(family, ["v"], seed=48)
    tree, hooks = str(model), count_hooks(model)
    with torch.no_grad():
        ref = model(**kw).logits
        handle = vtprune.apply(model, "temporal", keep=0.3, min_per_frame=1.0)
        assert not torch.equal(model(**kw).logits, ref)
        handle.remove()
        assert torch.equal(model(**kw).logits, ref)
    assert str(model) == tree and count_hooks(model) == hooks


@pytest.fixture(scope="module")
def qwen():
    return tiny.qwen2_vl()


(
    test_floor_image_nothing_to_drop_equals_unpruned,
    test_floor_image_remove_restores_the_model,
    test_floor_image_cached_generate_equals_uncached,
    test_floor_image_padded_batch_equals_rows_alone,
) = shared_tables("temporal", {"qwen2_vl": "qwen"}, plan=dict(keep=0.3, min_per_frame=1.0))
