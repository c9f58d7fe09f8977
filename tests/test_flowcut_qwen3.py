"""FlowCut on Qwen3-VL: DeepStack features taken at tower blocks follow the tower's survivors."""

from __future__ import annotations

import pytest
import tiny
import torch
from helpers import shared_tables

import vtprune
from vtprune.runtime.tower import TOWER

SIZES = [(8, 12), (16, 16), (12, 8)]


@pytest.fixture(scope="module")
def qwen3():
    """Peaked tower attention, so groups leave after block 0, before the DeepStack blocks 1 and 2."""
    model = tiny.qwen3_vl()
    with torch.no_grad():
        for block in model.model.visual.blocks:
            block.attn.qkv.weight.mul_(20.0)
            block.attn.qkv.bias.add_(10.0)
    return model


def test_deepstack_rows_are_the_survivors_own(qwen3):
    """Each DeepStack tensor has one row per token: the block's merger on the patches present
    there at the survivors' slots, zeros at the groups already gone; the language model then
    is handed those tensors, in which every kept token has its rows."""
    kw = tiny.inputs("qwen3_vl", qwen3, [1, 2], seed=5, sizes=SIZES)
    total = sum(h * w for h, w in SIZES) // 4
    seen, injected = [], []

    def spy(module, args, output):
        present = TOWER.get().index[::4] // 4
        seen.append((present.clone(), module, args[0].clone(), output.clone()))

    lm = qwen3.model.language_model
    with torch.no_grad(), vtprune.pruned(qwen3, "flowcut", keep=0.25):
        shadowed = lm._deepstack_process  # the runtime's re-indexing wrapper on the instance

        def record(hidden, mask, embeds):
            injected.append((mask.clone(), embeds.clone()))
            return shadowed(hidden, mask, embeds)

        lm._deepstack_process = record
        handles = [m.register_forward_hook(spy) for m in qwen3.model.visual.deepstack_merger_list]
        try:
            qwen3(**kw)
        finally:
            for h in handles:
                h.remove()
            lm._deepstack_process = shadowed
        kept = vtprune.stats(qwen3).selections["flowcut"]
    assert len(seen) == 3 and seen[-1][0].numel() < total  # blocks 1 and 2 ran on fewer groups
    full_rows = []
    for present, merger, inputs, output in seen:
        assert output.shape[0] == total
        torch.testing.assert_close(output[present], merger(inputs))
        gone = torch.ones(total, dtype=torch.bool)
        gone[present] = False
        assert not output[gone].any()
        full_rows.append(output)
    # the placeholders the language model keeps, in prompt order, are the tokens whose rows it gets
    ids = kw["input_ids"]
    placeholders = torch.nonzero(ids == tiny.IMAGE)  # row-major, as HF scatters
    order = {(int(r), int(c)): t for t, (r, c) in enumerate(placeholders.tolist())}
    tokens = torch.tensor([order[(b, int(p))] for b in range(ids.shape[0]) for p in kept[b].tolist()])
    assert len(injected) == 3
    for (mask, embeds), full in zip(injected, full_rows):
        # HF hands the text model these one-row-per-token tensors (the runtime then keeps the
        # rows of the tokens each layer holds, as for a vision stage's picks)
        assert int(mask.sum()) == total and torch.equal(embeds, full)
        assert full[tokens].abs().sum(-1).gt(0).all()  # every kept token has its own rows


@pytest.mark.parametrize("keep", [0.5, 0.25, 0.11])
def test_keep_target_within_two_percent(keep):
    model = tiny.qwen3_vl(num_hidden_layers=32)
    kw = tiny.inputs("qwen3_vl", model, [1], seed=1, sizes=[(32, 32)])  # 256 tokens
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
) = shared_tables("flowcut", {"qwen3_vl": "qwen3"}, plan=dict(keep=0.3))


@pytest.mark.parametrize("keep", [1.0, 0.3])
def test_an_image_and_a_video_in_one_prompt(qwen3, keep):
    """A clip's frames (written after their timestamps) prune per frame, DeepStack rows included."""
    kw = tiny.media_inputs("qwen3_vl", ["iv"], seed=3, frames=2, sizes=[(8, 12), (16, 16)])
    with torch.no_grad():
        ref = qwen3(**kw).logits
        with vtprune.pruned(qwen3, "flowcut", keep=keep):
            out = qwen3(**kw).logits
            st = vtprune.stats(qwen3)
    if keep == 1.0:
        assert torch.equal(out, ref)
    else:
        assert abs(st.keep_ratio - keep) / keep <= 0.02, st.keep_ratio
        assert st.tower_tokens_per_layer[-1] < st.tower_tokens_per_layer[0]
