"""Recycling dropped tokens into kept ones (``recycle="nearest"``): the vectorised merge against a
plain loop, and the option on every vision-stage method that offers it, on three families."""

from __future__ import annotations

import functools

import pytest
import tiny
import torch
from helpers import greedy, image_runs, uncached_greedy

import vtprune
from vtprune.recycling import recycle_nearest

METHODS = ["divprune", "cdpruner", "random", "uniform", "hired"]
FAMILIES = ["llava", "llava_next", "qwen2_vl"]
SIZES = {"llava": None, "llava_next": [(32, 64), (64, 32)], "qwen2_vl": [(16, 16), (12, 16)]}
SIZES3 = {
    "llava": None,
    "llava_next": [(32, 64), (64, 64), (64, 32)],
    "qwen2_vl": [(16, 16), (8, 12), (12, 16)],
}


@functools.cache
def _model(family: str):
    """One tiny model per family for the whole file (every test restores it on leaving)."""
    return tiny.BUILDERS[family]()


def reference_merge(x: torch.Tensor, kept: list[int], eligible: list[bool]) -> dict[int, torch.Tensor]:
    """The rule written plainly: each dropped eligible row joins the eligible kept row of largest
    cosine (first on ties); each kept row becomes the mean of itself and its members."""
    x = x.double()
    receivers = [j for j in kept if eligible[j]]
    groups = {j: [x[j]] for j in kept}
    for i in range(x.shape[0]):
        if i in kept or not eligible[i] or not receivers:
            continue
        cos = [float(torch.nn.functional.cosine_similarity(x[i], x[j], dim=0)) for j in receivers]
        groups[receivers[cos.index(max(cos))]].append(x[i])
    return {j: torch.stack(members).mean(0) for j, members in groups.items()}


@pytest.mark.parametrize("n,k,d", [(12, 3, 4), (50, 9, 16), (200, 40, 32)])
def test_vectorised_merge_equals_the_plain_loop(n, k, d):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, d, generator=g)
    kept = torch.randperm(n, generator=g)[:k]
    eligible = torch.rand(n, generator=g) > 0.2
    got = recycle_nearest(x, kept, eligible)
    ref = reference_merge(x, kept.tolist(), eligible.tolist())
    for row, j in enumerate(kept.tolist()):
        torch.testing.assert_close(got[row].double(), ref[j], rtol=1e-5, atol=1e-6)
        if not eligible[j]:
            assert torch.equal(got[row], x[j])  # an ineligible kept row receives nothing


def test_merge_with_no_eligible_receiver_changes_nothing():
    x = torch.randn(6, 3)
    eligible = torch.tensor([True, True, False, True, True, True])
    assert torch.equal(recycle_nearest(x, torch.tensor([2]), eligible), x[2:3])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_keep_everything_with_recycling_equals_unpruned(family, method):
    model = _model(family)
    kw = tiny.inputs(family, model, [1, 2, 0], seed=1, sizes=SIZES3[family])
    with torch.no_grad():
        ref = model(**kw).logits
        with vtprune.pruned(model, method, keep=1.0, recycle="nearest"):
            out = model(**kw).logits
    assert torch.equal(out, ref)


def _run(model, kw, method, **opts):
    """Logits, the language model's unpruned and pruned input embeddings, and the kept sets."""
    seen = {}

    def grab(name):
        def hook(module, args, kwargs):
            seen.setdefault(name, kwargs["inputs_embeds"].clone())

        return hook

    lm = model.model.language_model
    first = lm.register_forward_pre_hook(grab("before"), with_kwargs=True)  # runs before vtprune's
    try:
        with torch.no_grad(), vtprune.pruned(model, method, **opts):
            last = lm.register_forward_pre_hook(grab("after"), with_kwargs=True)  # runs after
            try:
                logits = model(**kw).logits
            finally:
                last.remove()
            st = vtprune.stats(model)
            kept, ratio = st.selections[method], st.keep_ratio
    finally:
        first.remove()
    return logits, seen["before"], seen["after"], kept, ratio


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_recycled_embeddings_are_the_reference_means_and_counts_unchanged(family, method):
    model = _model(family)
    kw = tiny.inputs(family, model, [2], seed=7, sizes=SIZES[family])
    opts = dict(keep=0.3)
    plain_logits, _, plain_after, plain_kept, plain_ratio = _run(model, kw, method, **opts)
    logits, x, after, kept, ratio = _run(model, kw, method, recycle="nearest", **opts)
    # the selection and the keep accounting are untouched; the embeddings and the outputs are not
    assert [k.tolist() for k in kept] == [k.tolist() for k in plain_kept] and ratio == plain_ratio
    assert after.shape == plain_after.shape and not torch.equal(after, plain_after)
    assert not torch.equal(logits, plain_logits)
    newline = getattr(model.model, "image_newline", None)
    expected = x[0].clone()
    kept_row = set(kept[0].tolist())
    keep_slot = torch.ones(x.shape[1], dtype=torch.bool)
    for _, pos in image_runs(kw["input_ids"]):
        local = [i for i, p in enumerate(pos.tolist()) if p in kept_row]
        keep_slot[pos] = False
        keep_slot[pos[local]] = True
        eligible = [True] * pos.numel()
        if newline is not None:
            eligible = (~(x[0, pos] == newline).all(-1)).tolist()
        for j, vec in reference_merge(x[0, pos], local, eligible).items():
            expected[pos[j]] = vec.to(expected.dtype)
    torch.testing.assert_close(after[0], expected[keep_slot], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_recycling_survives_replay_cached_equals_uncached(family):
    """CDPruner reads the prompt, so an uncached replay reuses its kept set: the recycling merges
    must be redone there, or the replayed steps would see unmerged embeddings."""
    model = _model(family)
    kw = tiny.inputs(family, model, [1], seed=3, sizes=SIZES[family] and SIZES[family][:1])
    with vtprune.pruned(model, "cdpruner", keep=0.3, recycle="nearest"):
        cached = greedy(model, kw, 5)
        reference = uncached_greedy(model, kw, vtprune.stats(model).selections, 5)
    assert torch.equal(cached, reference)


@pytest.mark.parametrize("method", METHODS)
def test_bad_recycle_names_the_option(method):
    model = _model("llava")
    with pytest.raises(
        ValueError, match=rf"{method}: option 'recycle'='clusters' is invalid; allowed: 'none', 'nearest'"
    ):
        vtprune.apply(model, method, recycle="clusters")
