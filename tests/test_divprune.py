"""DivPrune: the max-min building block, the official rule as a plain reference, keep accounting."""

from __future__ import annotations

import pytest
import tiny
import torch
from helpers import image_runs

import vtprune
from vtprune.diversity import max_min_diversity


def official_rule(x: torch.Tensor, k: int) -> list[int]:
    """The official DivPrune loop, written plainly: at each step the minimum distance to every
    chosen row is recomputed from scratch (the first step takes each column's second-smallest
    distance, its own being the smallest)."""
    xn = x.float() / x.float().norm(dim=1, keepdim=True)
    d = 1.0 - xn @ xn.T
    chosen: list[int] = []
    for i in range(k):
        if i == 0:
            scores = torch.topk(d, 2, dim=0, largest=False).values[1]
        else:
            scores = d[chosen].min(0).values
        chosen.append(int(torch.argmax(scores)))
    return sorted(chosen)


@pytest.mark.parametrize("n,k", [(7, 3), (64, 16), (300, 30)])
def test_running_minimum_equals_the_official_loop(n, k):
    x = torch.randn(n, 12, generator=torch.Generator().manual_seed(n))
    assert max_min_diversity(x, k).tolist() == official_rule(x, k)


CASES = {
    "llava": dict(images=[1, 2, 0], sizes=None),
    "llava_next": dict(images=[1, 2], sizes=[(32, 64), (64, 64), (64, 32)]),
    "qwen2_vl": dict(images=[2, 1], sizes=[(16, 16), (8, 12), (12, 16)]),
}


@pytest.mark.parametrize("family", sorted(CASES))
@pytest.mark.parametrize("keep", [0.3, 0.1])
def test_kept_set_equals_the_official_rule_on_the_projector_outputs(family, keep):
    """Per image (LLaVA-NeXT: over its whole sequence, newlines included), the kept tokens are the
    official rule's choice on the language model's input embeddings of the image."""
    model = tiny.BUILDERS[family]()
    case = CASES[family]
    kw = tiny.inputs(family, model, case["images"], seed=11, sizes=case["sizes"])
    seen = {}
    lm = model.model.language_model

    def keep_input(module, args, kwargs):
        seen.setdefault("x", kwargs["inputs_embeds"])

    grab = lm.register_forward_pre_hook(keep_input, with_kwargs=True)
    try:
        with torch.no_grad(), vtprune.pruned(model, "divprune", keep=keep):
            model(**kw)  # the hook was registered first: it sees the unpruned inputs
            kept = vtprune.stats(model).selections["divprune"]
    finally:
        grab.remove()
    expected = [[] for _ in case["images"]]
    for row, pos in image_runs(kw["input_ids"]):
        k = int(keep * pos.numel() + 0.5)
        expected[row] += pos[official_rule(seen["x"][row, pos], k)].tolist()
    assert [k.tolist() for k in kept] == [sorted(e) for e in expected]


def test_per_crop_keeps_newlines_and_splits_the_budget_over_crops():
    model = tiny.llava_next()
    kw = tiny.inputs("llava_next", model, [1], seed=12, sizes=[(64, 64)])
    from vtprune.integrations.llava_next import LlavaNextAdapter

    spec = LlavaNextAdapter(model)._spec([64, 64])
    start = int(torch.nonzero(kw["input_ids"][0] == tiny.IMAGE)[0])
    with torch.no_grad():
        with vtprune.pruned(model, "divprune", keep=0.25, per_crop=True):
            model(**kw)
            kept = vtprune.stats(model).selections["divprune"][0] - start
        with vtprune.pruned(model, "divprune", keep=0.25):
            model(**kw)
            whole = vtprune.stats(model).selections["divprune"][0] - start
    n = spec.num_tokens
    assert kept.numel() == whole.numel() == int(0.25 * n + 0.5)
    assert set(spec.newline_offsets) <= set(kept.tolist())
    crop_of = torch.where(spec.source >= 0, spec.source // 65, -1)[kept]
    patches = (spec.source >= 0).sum()
    budget = kept.numel() - len(spec.newline_offsets)
    for crop in range(spec.crops):  # each crop gets its share of the patch budget (within one token)
        share = budget * int((torch.where(spec.source >= 0, spec.source // 65, -1) == crop).sum()) / patches
        assert abs(int((crop_of == crop).sum()) - float(share)) < 1


@pytest.mark.parametrize(
    "family,sizes",
    [("llava", None), ("llava_next", [(64, 64), (32, 64), (48, 64)]), ("qwen2_vl", [(32, 32), (24, 40)])],
)
@pytest.mark.parametrize("keep", [0.5, 0.25, 0.11])
def test_keep_target_within_two_percent_on_every_family(family, sizes, keep):
    model = tiny.BUILDERS[family]()
    n_images = len(sizes) if sizes else 3
    kw = tiny.inputs(family, model, [n_images], seed=13, sizes=sizes)
    with torch.no_grad(), vtprune.pruned(model, "divprune", keep=keep):
        model(**kw)
        got = vtprune.stats(model).keep_ratio
    assert abs(got - keep) / keep <= 0.02, (family, keep, got)


def test_needs_no_tower_probe():
    """Attention-free: no vision-tower hooks are installed (the tower runs untouched)."""
    from helpers import count_hooks

    model = tiny.llava()
    before = count_hooks(model.model.vision_tower)
    with vtprune.pruned(model, "divprune", keep=0.25):
        assert count_hooks(model.model.vision_tower) == before
