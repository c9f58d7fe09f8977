"""FlowCut on Qwen2.5-VL: whole merge groups leave a window-permuted tower; every block attends
within its own windows (or its image, at the full-attention blocks) of the survivors."""

from __future__ import annotations

import pytest
import tiny
import torch
from helpers import shared_tables
from transformers.vision_utils import get_vision_window_index

import vtprune
from vtprune.runtime.tower import TOWER

DEPTH, FULL = 8, (3, 7)
SIZES = [(8, 12), (16, 16), (12, 8)]


@pytest.fixture(scope="module")
def qwen25():
    """A tower whose attention is peaked (scaled q/k/v projections with a shared offset), so the
    entropy schedule drops groups between blocks, not only before the merger."""
    model = tiny.qwen2_5_vl(tower_depth=DEPTH, fullatt=FULL)
    with torch.no_grad():
        for block in model.model.visual.blocks:
            block.attn.qkv.weight.mul_(20.0)
            block.attn.qkv.bias.add_(10.0)
    return model


def test_blocks_attend_within_the_survivors_windows(qwen25):
    """At every block the boundaries handed over are the runs of surviving patches of one window
    (window blocks) or one image (full-attention blocks), in HF's own window order; merge groups
    stay whole; groups leave between blocks."""
    kw = tiny.inputs("qwen2_5_vl", qwen25, [1, 2], seed=5, sizes=SIZES)
    vc = qwen25.config.vision_config
    _, cu = get_vision_window_index(
        kw["image_grid_thw"], vc.spatial_merge_size, vc.window_size, vc.patch_size
    )
    window = torch.repeat_interleave(torch.arange(cu.numel() - 1), cu.diff().long())
    sizes = [h * w for h, w in SIZES]
    image = torch.repeat_interleave(torch.arange(len(SIZES)), torch.tensor(sizes))
    seen = []

    def spy(i):
        def hook(module, args, kwargs):
            present = TOWER.get().index.cpu()
            hidden = args[0] if args else kwargs["hidden_states"]
            seen.append((i, present, kwargs["cu_seqlens"].cpu().long(), hidden.shape[0]))

        return hook

    with torch.no_grad(), vtprune.pruned(qwen25, "flowcut", keep=0.25):
        handles = [
            b.register_forward_pre_hook(spy(i), with_kwargs=True)
            for i, b in enumerate(qwen25.model.visual.blocks)
        ]
        try:
            qwen25(**kw)
        finally:
            for h in handles:
                h.remove()
    assert [s[0] for s in seen] == list(range(DEPTH))
    assert seen[-1][3] < seen[0][3]  # groups left inside the tower
    for i, present, cu_now, n in seen:
        assert present.numel() == n
        groups = present.view(-1, 4)
        assert torch.equal(groups - groups[:, :1], torch.arange(4).expand_as(groups))
        # window-order position -> window; the image of a window-order patch (windows lie inside images)
        owner = window[present] if i not in FULL else image[present]
        _, runs = torch.unique_consecutive(owner, return_counts=True)
        assert torch.equal(cu_now, torch.nn.functional.pad(runs.cumsum(0), (1, 0))), i


def test_tower_tokens_fall_as_planned(qwen25):
    kw = tiny.inputs("qwen2_5_vl", qwen25, [1], seed=1, sizes=[(16, 16)])
    with torch.no_grad(), vtprune.pruned(qwen25, "flowcut", keep=0.25):
        qwen25(**kw)
        st = vtprune.stats(qwen25)
    tower = st.tower_tokens_per_layer
    assert len(tower) == DEPTH and tower[0] == 256
    assert all(a >= b for a, b in zip(tower, tower[1:])) and tower[-1] < 256
    assert all(t % 4 == 0 for t in tower)  # whole merge groups
    assert st.visual_tokens_per_layer == [16.0] * tiny.LAYERS  # round(0.25 * 64) merged tokens


@pytest.mark.parametrize("keep", [0.5, 0.25, 0.11])
def test_keep_target_within_two_percent(keep):
    model = tiny.qwen2_5_vl(num_hidden_layers=32)
    kw = tiny.inputs("qwen2_5_vl", model, [1], seed=1, sizes=[(32, 32)])  # 256 tokens, 16 windows
    with torch.no_grad(), vtprune.pruned(model, "flowcut", keep=keep):
        model(**kw)
        got = vtprune.stats(model).keep_ratio
    assert abs(got - keep) / keep <= 0.02, got


# -- the shared equivalence tables ---------------------------------------------------------------
(
    test_nothing_to_drop_equals_unpruned,
    test_remove_restores_the_model,
    test_cached_generate_equals_uncached,
    test_padded_batch_equals_rows_alone,
) = shared_tables("flowcut", {"qwen2_5_vl": "qwen25"}, plan=dict(keep=0.3))


@pytest.mark.parametrize("keep", [1.0, 0.3])
def test_an_image_and_a_video_in_one_prompt(qwen25, keep):
    """Frames are attention sequences whose windows stay inside them: a clip prunes per frame."""
    kw = tiny.media_inputs("qwen2_5_vl", ["iv"], seed=3, frames=2, sizes=[(8, 12), (16, 16)])
    with torch.no_grad():
        ref = qwen25(**kw).logits
        with vtprune.pruned(qwen25, "flowcut", keep=keep):
            out = qwen25(**kw).logits
            st = vtprune.stats(qwen25)
    if keep == 1.0:
        assert torch.equal(out, ref)
    else:
        assert abs(st.keep_ratio - keep) / keep <= 0.02, st.keep_ratio
        assert st.tower_tokens_per_layer[-1] < st.tower_tokens_per_layer[0]
