"""Zero-TPrune on Qwen2.5-VL: the map is the whole image's at every block (window blocks
included), rebuilt from the block's window-permuted q/k; checked against a plain reference run in
token order; whole merge groups, keep within 2%, the shared tables."""

from __future__ import annotations

import math

import pytest
import tiny
import torch
from helpers import attention_input, merger_index, qwen_tower_qk, shared_tables, unpermute
from test_zerotprune import loop_pagerank, loop_two_stages, picks

import vtprune

DEPTH, FULL = 4, (1,)  # blocks 0, 2 and 3 attend per window, block 1 per image
SIZES = [(16, 16), (8, 12), (12, 16)]  # several windows each (windows of 2x2 merge units)


@pytest.fixture(scope="module")
def qwen25():
    """Random tiny weights give a map uniform to float noise (every entry 1/n to 4 digits), whose
    PageRank order is then the summation order's; sharper q/k give the graph real structure."""
    model = tiny.qwen2_5_vl(tower_depth=DEPTH, fullatt=FULL)
    with torch.no_grad():
        for block in model.model.visual.blocks:
            block.attn.qkv.weight[: 2 * block.attn.qkv.weight.shape[1]] *= 6
    return model


def token_order_maps(model, kw, layer: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per image, ``(head-mean attention [n, n], head-mean keys [n, d])`` of block ``layer`` over
    the whole image in token order (an unpruned run), with the full eager map: the attention's input
    and rotary tables are put back from the tower's window order first."""
    visual = model.model.visual
    attn = visual.blocks[layer].attn
    order = {}
    permute = visual.permute_input_for_window_attn

    def record(tensor, window_index, seq_len):
        order.setdefault("window_index", window_index)
        return permute(tensor, window_index, seq_len=seq_len)

    visual.permute_input_for_window_attn = record
    try:
        seen = attention_input(model, kw, attn)  # unpruned: no plan on the model
    finally:
        del visual.permute_input_for_window_attn
    perm = (order["window_index"][:, None] * 4 + torch.arange(4)).flatten()  # window slot -> token patch
    rope = tuple(unpermute(t, perm) for t in seen["rope"])
    q, k = qwen_tower_qk(attn, unpermute(seen["x"], perm), rope)
    bounds = [0] + torch.tensor([h * w for h, w in SIZES]).cumsum(0).tolist()  # patches per image
    out = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        qi, ki = q[a:b].transpose(0, 1).float(), k[a:b].transpose(0, 1).float()  # [H, n, d]
        weights = torch.softmax(qi @ ki.transpose(-1, -2) * attn.scaling, dim=-1)
        out.append((weights.mean(0), ki.mean(0)))
    return out


@pytest.mark.parametrize("layer", [DEPTH - 1, 1])  # the default (a window block here), a full block
@pytest.mark.parametrize("keep", [0.3, 0.11])
def test_kept_sets_equal_the_plain_reference(qwen25, keep, layer):
    kw = tiny.inputs("qwen2_5_vl", qwen25, [1, 2], seed=5, sizes=SIZES)
    ref = []
    for attn, keys in token_order_maps(qwen25, kw, layer):
        s = loop_pagerank(attn, 30)
        scores = [sum(s[i : i + 4]) for i in range(0, len(s), 4)]
        unit_keys = keys.view(-1, 4, keys.shape[-1]).mean(1).tolist()
        target = max(1, math.floor(keep * len(scores) + 0.5))
        ref.append(loop_two_stages(scores, unit_keys, target, 0.5))
    with torch.no_grad(), vtprune.pruned(qwen25, "zerotprune", keep=keep, layers=[layer]):
        qwen25(**kw)
        assert picks(qwen25, kw) == ref


def test_merge_groups_stay_whole(qwen25):
    kw = tiny.inputs("qwen2_5_vl", qwen25, [1, 2], seed=5, sizes=SIZES)
    index, st = merger_index(qwen25, kw, "zerotprune", keep=0.2, layers=[0, 2])
    groups = index.view(-1, 4)  # window-order patches of the survivors
    kept = round(0.2 * 64) + round(0.2 * 24) + round(0.2 * 48)
    assert groups.shape[0] == kept
    assert torch.equal(groups - groups[:, :1], torch.arange(4).expand_as(groups))
    assert torch.equal(groups[:, 0] % 4, torch.zeros_like(groups[:, 0]))
    tower = st.tower_tokens_per_layer
    assert tower[0] == (64 + 24 + 48) * 4 / 3 > tower[1] == tower[2] > tower[3] == kept * 4 / 3


@pytest.mark.parametrize("keep", [0.5, 0.25, 0.11])
def test_keep_target_within_two_percent(qwen25, keep):
    kw = tiny.inputs("qwen2_5_vl", qwen25, [1], seed=1, sizes=[(32, 32)])  # 256 tokens, 16 windows
    with torch.no_grad(), vtprune.pruned(qwen25, "zerotprune", keep=keep, layers=[1, 3]):
        qwen25(**kw)
        got = vtprune.stats(qwen25).keep_ratio
    assert abs(got - keep) / keep <= 0.02, got


# -- the shared equivalence tables ---------------------------------------------------------------
(
    test_nothing_to_drop_equals_unpruned,
    test_remove_restores_the_model,
    test_cached_generate_equals_uncached,
    test_padded_batch_equals_rows_alone,
) = shared_tables("zerotprune", {"qwen2_5_vl": "qwen25"}, plan=dict(keep=0.3, layers=[0, 2]))
