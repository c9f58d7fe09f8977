"""Tower stages on Qwen videos: FlowCut on Qwen2-VL, Zero-TPrune on Qwen2-VL, Qwen2.5-VL and Qwen3-VL
(FlowCut's Qwen2.5-VL / Qwen3-VL videos: tests/test_flowcut_qwen25.py, test_flowcut_qwen3.py).

A video reaches the tower as one attention sequence per temporal patch: a tubelet of
``temporal_patch_size`` frames is one patch, so a merge group is four patches of one tubelet (a
2x2 spatial block). Each tubelet is scored like an image (its own map / global row), and the video
keeps ``round(keep * tokens)`` split over its tubelets by their groups (``QwenTowerCall.plan``).
"""

from __future__ import annotations

import math

import pytest
import tiny
import torch
from helpers import attention_input, greedy, qwen_tower_qk, row_alone, uncached_greedy, unpermute
from test_zerotprune import loop_pagerank, loop_two_stages
from transformers.vision_utils import get_vision_window_index

import vtprune
from vtprune.runtime.tower import TOWER

PAIRS = [
    ("flowcut", "qwen2_vl"),
    ("zerotprune", "qwen2_vl"),
    ("zerotprune", "qwen2_5_vl"),
    ("zerotprune", "qwen3_vl"),
]
# zerotprune drops after blocks 0 and 1, so tower tokens fall inside the tower, not only at the merger
OPTIONS = {"flowcut": {}, "zerotprune": {"layers": [0, 1]}}
BATCH = ["iv", "v", "", "i"]  # mixed, video-only, text-only and image-only rows, left padded
CLIP = dict(frames=4, sizes=[(8, 8)])  # 4 tubelets of 16 merged tokens each


@pytest.fixture(scope="module")
def models():
    """Three-block towers with sharp q/k (random tiny weights give maps uniform to float noise):
    FlowCut's entropy schedule then drops after block 0, and PageRank has a real graph."""
    built = {}
    for family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        model = tiny.qwen2_vl(tower_depth=3) if family == "qwen2_vl" else tiny.BUILDERS[family]()
        with torch.no_grad():
            for block in model.model.visual.blocks:
                qk = 2 * block.attn.qkv.weight.shape[1]  # the q and k rows of the fused projection
                block.attn.qkv.weight[:qk] *= 20
                block.attn.qkv.bias[:qk] += 10
        built[family] = model
    return built


def plan(method: str, keep: float) -> dict:
    return dict(OPTIONS[method], keep=keep)


def shares(budget: int, units: list[int]) -> list[int]:
    """A video's budget split over its tubelets by their groups (cumulative rounding, >= 1 each)."""
    total, ends, acc = sum(units), [], 0
    for u in units:
        acc += u
        ends.append(math.floor(budget * acc / total + 0.5))
    return [max(1, b - a) for a, b in zip([0] + ends[:-1], ends)]


def media_picks(model, method, kw) -> dict[str, list[int]]:
    """Local kept tokens of the single prompt's image (``"i"``) and video (``"v"``)."""
    (pos,) = vtprune.stats(model).selections[method]
    ids, out = kw["input_ids"][0], {}
    for kind, tid in (("i", tiny.IMAGE), ("v", tiny.VIDEO)):
        where = torch.nonzero(ids == tid).flatten()
        if where.numel():
            out[kind] = torch.nonzero(torch.isin(where, pos.to(where.device))).flatten().tolist()
    return out


@pytest.mark.parametrize("method, family", PAIRS)
def test_keep_everything_equals_unpruned(models, method, family):
    model = models[family]
    kw = tiny.media_inputs(family, BATCH, seed=1)
    with torch.no_grad():
        ref = model(**kw).logits
        with vtprune.pruned(model, method, **plan(method, 1.0)):
            assert torch.equal(model(**kw).logits, ref)


@pytest.mark.parametrize("method, family", PAIRS)
def test_cached_generate_equals_uncached(models, method, family):
    model = models[family]
    kw = tiny.media_inputs(family, ["vi"], seed=3)
    with vtprune.pruned(model, method, **plan(method, 0.3)):
        cached = greedy(model, kw, 4)
        selections = vtprune.stats(model).selections
        visual = int(torch.isin(kw["input_ids"], torch.tensor([tiny.IMAGE, tiny.VIDEO])).sum())
        assert 0 < selections[method][0].numel() < visual  # the tower really dropped tokens
        reference = uncached_greedy(model, kw, selections, 4)
    assert torch.equal(cached, reference)


@pytest.mark.parametrize("method, family", PAIRS)
def test_padded_batch_equals_rows_alone(models, method, family):
    model = models[family]
    kw = tiny.media_inputs(family, BATCH, seed=4)
    with vtprune.pruned(model, method, **plan(method, 0.3)):
        batch = greedy(model, kw, 3)
        rows = [greedy(model, row_alone(family, kw, b, BATCH), 3) for b in range(len(BATCH))]
    assert torch.equal(batch, torch.cat(rows))


@pytest.mark.parametrize("method, family", PAIRS)
def test_an_image_and_a_video_in_one_prompt(models, method, family):
    """Video first, then an image: each keeps exactly what it keeps as the prompt's only medium
    (the two tower runs do not mix), and each keeps round(keep * its tokens)."""
    model = models[family]
    sizes = [(8, 8), (8, 12)]
    kw = tiny.media_inputs(family, ["vi"], seed=5, sizes=sizes)
    video = tiny.media_inputs(family, ["v"], seed=5, sizes=sizes[:1])
    video.update(pixel_values_videos=kw["pixel_values_videos"])
    image = tiny.media_inputs(family, ["i"], seed=5, sizes=sizes[1:])
    image.update(pixel_values=kw["pixel_values"])

    def picks(call):
        with torch.no_grad(), vtprune.pruned(model, method, **plan(method, 0.3)):
            model(**call)
            return media_picks(model, method, call)

    both = picks(kw)
    assert both["v"] == picks(video)["v"] and both["i"] == picks(image)["i"]
    assert (len(both["v"]), len(both["i"])) == (round(0.3 * 32), round(0.3 * 24))


@pytest.mark.parametrize("keep", [0.3, 0.11])
@pytest.mark.parametrize("method, family", PAIRS)
def test_keep_within_two_percent_of_the_video(models, method, family, keep):
    """4 tubelets of 16 tokens: a rounding per tubelet would keep 20 (keep 0.3) or 8 (keep 0.11)
    of 64, 4% and 14% off; the video's own budget is 19 or 7."""
    model = models[family]
    kw = tiny.media_inputs(family, ["v"], seed=6, **CLIP)
    with torch.no_grad(), vtprune.pruned(model, method, **plan(method, keep)):
        model(**kw)
        got = vtprune.stats(model).keep_ratio
    assert abs(got - keep) / keep <= 0.02, got


def window_to_token(model, kw) -> torch.Tensor:
    """Qwen2.5-VL: the token-order patch at each of the tower's window-order slots (one video)."""
    vc = model.config.vision_config
    order, _ = get_vision_window_index(
        kw["video_grid_thw"], vc.spatial_merge_size, vc.window_size, vc.patch_size
    )
    return (order[:, None] * 4 + torch.arange(4)).flatten()


def tubelet_of_patch(family: str, model, kw) -> torch.Tensor:
    """The tubelet of each patch at the tower's slots (window order on Qwen2.5-VL) for one video."""
    t, h, w = kw["video_grid_thw"][0].tolist()
    tubelet = torch.arange(t).repeat_interleave(h * w)  # token order: tubelet after tubelet
    return tubelet[window_to_token(model, kw)] if family == "qwen2_5_vl" else tubelet


@pytest.mark.parametrize("method, family", PAIRS)
def test_tower_tokens_fall_and_merge_groups_stay_whole(models, method, family):
    """At every block and at the merger the present patches are whole aligned groups of four (one
    tubelet's 2x2 block), every image-level block attends within one tubelet's survivors, tokens
    fall inside the tower, and each tubelet ends with its share of the video's budget."""
    model = models[family]
    kw = tiny.media_inputs(family, ["v"], seed=7, **CLIP)
    tubelet = tubelet_of_patch(family, model, kw)
    full = set(getattr(model.config.vision_config, "fullatt_block_indexes", range(3)))
    visual, seen = model.model.visual, []

    def spy(i):
        def hook(module, args, kwargs):
            cu = kwargs.get("cu_seqlens")
            seen.append((i, TOWER.get().index.cpu(), None if cu is None else cu.cpu().long()))

        return hook

    with torch.no_grad(), vtprune.pruned(model, method, **plan(method, 0.11)):
        # registered after the plan's own pre-hooks, so they see what the blocks really get
        handles = [b.register_forward_pre_hook(spy(i), with_kwargs=True) for i, b in enumerate(visual.blocks)]
        handles.append(visual.merger.register_forward_pre_hook(spy(len(handles)), with_kwargs=True))
        try:
            model(**kw)
        finally:
            for handle in handles:
                handle.remove()
        st = vtprune.stats(model)
    for i, present, cu in seen:
        groups = present.view(-1, 4)
        assert torch.equal(groups - groups[:, :1], torch.arange(4).expand_as(groups)), i
        assert bool((groups[:, 0] % 4 == 0).all()), i
        owner = tubelet[present]
        assert bool((owner.view(-1, 4) == owner.view(-1, 4)[:, :1]).all()), i  # a group is one tubelet's
        if i in full:
            _, runs = torch.unique_consecutive(owner, return_counts=True)
            assert torch.equal(cu, torch.nn.functional.pad(runs.cumsum(0), (1, 0))), i
    last = tubelet[seen[-1][1]].view(-1, 4)[:, 0]
    assert torch.bincount(last, minlength=4).tolist() == shares(round(0.11 * 64), [16] * 4)
    tower = st.tower_tokens_per_layer
    assert tower[0] == 4 * 64 and all(a >= b for a, b in zip(tower, tower[1:])) and tower[-1] < tower[0]
    assert all(t % 4 == 0 for t in tower)


# -- Zero-TPrune's rule on a video, written plainly ------------------------------------------------
def last_block_maps(family: str, model, kw) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per tubelet, ``(head-mean attention [n, n], head-mean keys [n, d])`` of the last block over
    all the tubelet's patches in token order (an unpruned run, full eager map): the tower attends
    per tubelet, so this is the graph the tubelet's tokens live in, as an image's is its own."""
    attn = model.model.visual.blocks[-1].attn
    seen = attention_input(model, kw, attn)  # unpruned: no plan on the model
    x, rope = seen["x"], seen["rope"]
    if family == "qwen2_5_vl":  # back from the tower's window order to token order
        perm = window_to_token(model, kw)
        x, rope = unpermute(x, perm), tuple(unpermute(r, perm) for r in rope)
    q, k = qwen_tower_qk(attn, x, rope)
    t, h, w = kw["video_grid_thw"][0].tolist()
    out = []
    for a in range(0, t * h * w, h * w):
        qi, ki = q[a : a + h * w].transpose(0, 1).float(), k[a : a + h * w].transpose(0, 1).float()
        weights = torch.softmax(qi @ ki.transpose(-1, -2) * attn.scaling, dim=-1)
        out.append((weights.mean(0), ki.mean(0)))
    return out


@pytest.mark.parametrize("keep", [0.3, 0.2])  # tubelet shares 5, 5, 4, 5 and 3, 4, 3, 3 groups
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_zerotprune_video_equals_the_plain_reference(models, family, keep):
    """Default layer (the last block): per tubelet its own map, looped PageRank and the looped
    two-stage pick on its 2x2 groups, with its share of the video's round(keep * tokens)."""
    model = models[family]
    kw = tiny.media_inputs(family, ["v"], seed=8, **CLIP)
    maps = last_block_maps(family, model, kw)
    ref, offset = [], 0
    for (attn, keys), target in zip(maps, shares(round(keep * 64), [16] * 4)):
        s = loop_pagerank(attn, 30)
        scores = [sum(s[i : i + 4]) for i in range(0, len(s), 4)]
        unit_keys = keys.view(-1, 4, keys.shape[-1]).mean(1).tolist()
        ref += [offset + u for u in loop_two_stages(scores, unit_keys, target, 0.5)]
        offset += len(scores)
    with torch.no_grad(), vtprune.pruned(model, "zerotprune", keep=keep):
        model(**kw)
        assert media_picks(model, "zerotprune", kw)["v"] == ref


@pytest.mark.parametrize("method", ["flowcut", "zerotprune"])
def test_every_tubelet_keeps_a_group_below_one_a_tubelet(models, method):
    """keep=0.02 of 4 x 16 tokens is a budget of 1: no tubelet's attention sequence is emptied,
    each keeps one group (the only case where the video keeps more than round(keep * tokens))."""
    model = models["qwen2_vl"]
    kw = tiny.media_inputs("qwen2_vl", ["v"], seed=9, **CLIP)
    with torch.no_grad(), vtprune.pruned(model, method, **plan(method, 0.02)):
        model(**kw)
        kept = media_picks(model, method, kw)["v"]
    assert [u // 16 for u in kept] == [0, 1, 2, 3]
