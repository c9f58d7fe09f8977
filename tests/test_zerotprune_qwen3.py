"""Zero-TPrune on Qwen3-VL: the plain reference on whole merge groups (as on Qwen2-VL), DeepStack
rows that follow the survivors, keep within 2%, the shared tables."""

from __future__ import annotations

import math

import pytest
import test_zerotprune as zt
import tiny
import torch
from helpers import shared_tables

import vtprune
from vtprune.runtime.tower import TOWER

SIZES = [(16, 16), (8, 12), (12, 16)]


@pytest.fixture(scope="module")
def qwen3():
    """3 tower blocks, each feeding DeepStack. Random tiny weights give a map uniform to float noise,
    whose PageRank order is the summation order's; sharper q/k give the graph real structure."""
    model = tiny.qwen3_vl()
    with torch.no_grad():
        for block in model.model.visual.blocks:
            block.attn.qkv.weight[: 2 * block.attn.qkv.weight.shape[1]] *= 6
    return model


@pytest.mark.parametrize("keep", [0.3, 0.11])
def test_kept_sets_equal_the_plain_reference(qwen3, keep):
    """Default layer (the last block, before the merger): full eager map of that block per image,
    looped PageRank, looped two-stage pick on 2x2 groups."""
    kw = tiny.inputs("qwen3_vl", qwen3, [1, 2], seed=5, sizes=SIZES)
    ref = zt.qwen_reference(qwen3, kw, lambda units: max(1, math.floor(keep * units + 0.5)))
    with torch.no_grad(), vtprune.pruned(qwen3, "zerotprune", keep=keep):
        qwen3(**kw)
        assert zt.picks(qwen3, kw) == ref


def test_merge_groups_stay_whole_and_deepstack_rows_follow(qwen3):
    """A drop after block 0: the DeepStack mergers of blocks 1 and 2 run on whole surviving groups,
    their rows land at the survivors' token slots (zeros at the groups gone), and every token the
    language model keeps has its own rows."""
    kw = tiny.inputs("qwen3_vl", qwen3, [1, 2], seed=5, sizes=SIZES)
    total = sum(h * w for h, w in SIZES) // 4
    seen = []

    def spy(module, args, output):
        index = TOWER.get().index
        seen.append((index.clone(), module, args[0].clone(), output.clone()))

    with torch.no_grad(), vtprune.pruned(qwen3, "zerotprune", keep=0.25, layers=[0]):
        handles = [m.register_forward_hook(spy) for m in qwen3.model.visual.deepstack_merger_list]
        try:
            qwen3(**kw)
        finally:
            for h in handles:
                h.remove()
        kept = vtprune.stats(qwen3).selections["zerotprune"]
    kept_units = sum(round(0.25 * h * w / 4) for h, w in SIZES)
    assert [s[0].numel() for s in seen] == [total * 4, kept_units * 4, kept_units * 4]
    for index, merger, inputs, output in seen:
        groups = index.view(-1, 4)
        assert torch.equal(groups - groups[:, :1], torch.arange(4).expand_as(groups))
        assert torch.equal(groups[:, 0] % 4, torch.zeros_like(groups[:, 0]))
        present = groups[:, 0] // 4
        assert output.shape[0] == total
        torch.testing.assert_close(output[present], merger(inputs))
        gone = torch.ones(total, dtype=torch.bool)
        gone[present] = False
        assert not output[gone].any()
    # the tokens the language model keeps are the groups present at the DeepStack blocks 1 and 2
    ids = kw["input_ids"]
    placeholders = torch.nonzero(ids == tiny.IMAGE)  # row-major, as HF scatters
    order = {(int(r), int(c)): t for t, (r, c) in enumerate(placeholders.tolist())}
    tokens = sorted(order[(b, int(p))] for b in range(ids.shape[0]) for p in kept[b].tolist())
    assert tokens == (seen[1][0][::4] // 4).tolist()


@pytest.mark.parametrize("keep", [0.5, 0.25, 0.11])
def test_keep_target_within_two_percent(qwen3, keep):
    kw = tiny.inputs("qwen3_vl", qwen3, [1], seed=1, sizes=[(32, 32)])  # 256 tokens
    with torch.no_grad(), vtprune.pruned(qwen3, "zerotprune", keep=keep, layers=[0, 2]):
        qwen3(**kw)
        got = vtprune.stats(qwen3).keep_ratio
    assert abs(got - keep) / keep <= 0.02, got


# -- the shared equivalence tables ---------------------------------------------------------------
(
    test_nothing_to_drop_equals_unpruned,
    test_remove_restores_the_model,
    test_cached_generate_equals_uncached,
    test_padded_batch_equals_rows_alone,
) = shared_tables("zerotprune", {"qwen3_vl": "qwen3"}, plan=dict(keep=0.3, layers=[0, 1]))
