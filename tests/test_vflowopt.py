"""VFlowOpt: hub-token importance vs a plain reference on eager tower attention, cell recycling,
newlines, options, and its schedule from vtprune.tune."""

from __future__ import annotations

import pytest
import tiny
import torch
from helpers import image_runs

import vtprune
from vtprune.scoring import hub_attention


def plain_importance(probs: torch.Tensor, t: float) -> torch.Tensor:
    """The official formula written plainly: head mean, received = column mean, hubs above
    ``t`` times the mean received (the most-attended token if none), mean of the hubs' rows."""
    a = probs.mean(0)
    n = a.shape[0]
    received = [sum(float(a[i, j]) for i in range(n)) / n for j in range(n)]
    mean = sum(received) / n
    hubs = [j for j in range(n) if received[j] > t * mean] or [max(range(n), key=lambda j: received[j])]
    return torch.stack([a[i] for i in hubs]).mean(0)


@pytest.mark.parametrize("t", [0.5, 1.5, 1e6])
def test_hub_attention_equals_the_plain_formula(t):
    probs = torch.softmax(torch.randn(3, 9, 9, generator=torch.Generator().manual_seed(2)) * 3, -1)
    torch.testing.assert_close(hub_attention(probs, t), plain_importance(probs, t))


def _tower_attention(model, kw, layer):
    with torch.no_grad():
        out = model.model.vision_tower(kw["pixel_values"], output_attentions=True)
    return out.attentions[layer]  # [images, H, 1 + 64, 1 + 64]


def _lm_inputs(model, kw, plan):
    """The kept sets and the language model's input embeddings as the pruned model hands them on
    (the hook goes on after the plan's own, so it sees the merges)."""
    seen = {}

    def grab(module, args, kwargs):
        seen.setdefault("x", kwargs["inputs_embeds"])

    lm = model.model.language_model
    with torch.no_grad(), vtprune.pruned(model, "vflowopt", **plan):
        hook = lm.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            model(**kw)
        finally:
            hook.remove()
        kept = vtprune.stats(model).selections["vflowopt"]
    return kept, seen["x"]


@pytest.mark.parametrize("keep, t", [(0.3, 39.26), (0.1, 1.5)])
def test_kept_set_equals_the_plain_rule_on_eager_tower_attention(keep, t):
    """LLaVA (CLS tower, default layer = the feature layer 1 of 3): the kept tokens are the top
    ``round(keep * 64)`` by the plain formula on the tower's own eager attention map."""
    model = tiny.llava(attn="eager")
    kw = tiny.inputs("llava", model, [1, 2, 0], seed=5)
    attn = _tower_attention(model, kw, 1)
    with torch.no_grad(), vtprune.pruned(model, "vflowopt", keep=keep, threshold=t):
        model(**kw)
        kept = vtprune.stats(model).selections["vflowopt"]
    expected = [[] for _ in range(3)]
    for img, (row, pos) in enumerate(image_runs(kw["input_ids"])):
        imp = plain_importance(attn[img].float(), t)[1:]  # CLS is no image token here
        k = int(keep * pos.numel() + 0.5)
        expected[row] += pos[torch.sort(imp, descending=True, stable=True).indices[:k]].tolist()
    assert [k.tolist() for k in kept] == [sorted(e) for e in expected]


def test_cell_recycling_equals_a_plain_reference():
    """keep 0.3 with 2x2 cells on LLaVA's 8x8 grid: the top tokens stay as they were; each cell's
    dropped tokens become their importance-weighted mean in the cell's most important one; top
    tokens plus cells is the budget."""
    model = tiny.llava(attn="eager")
    kw = tiny.inputs("llava", model, [1], seed=6)
    t, keep, m = 39.26, 0.3, 2
    attn = _tower_attention(model, kw, 1)
    base_kept, pruned_x = _lm_inputs(model, kw, dict(keep=keep, threshold=t, cell=m))
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=kw["pixel_values"])
        feats = (feats.pooler_output if hasattr(feats, "pooler_output") else feats)[0]
    ((row, pos),) = image_runs(kw["input_ids"])
    imp = plain_importance(attn[0].float(), t)[1:]
    ranked = torch.sort(imp, descending=True, stable=True).indices.tolist()
    cell = [(j // 8) // m * (8 // m) + (j % 8) // m for j in range(64)]
    budget = int(keep * 64 + 0.5)
    top = next(n for n in range(budget + 1) if n + len({cell[j] for j in ranked[n:]}) == budget)
    expected = {j: None for j in ranked[:top]}
    for c in sorted({cell[j] for j in ranked[top:]}):
        members = [j for j in ranked[top:] if cell[j] == c]
        w = imp[members] / imp[members].sum()
        expected[members[0]] = (w.unsqueeze(1) * feats.view(64, -1)[members].float()).sum(0)
    got = base_kept[0].tolist()
    assert got == sorted(int(pos[j]) for j in expected)
    # the language model sees the compacted sequence: text tokens and the kept image tokens
    present = torch.ones(kw["input_ids"].shape[1], dtype=torch.bool)
    present[pos] = False
    present[got] = True
    slot = torch.cumsum(present.long(), 0) - 1
    if pruned_x.shape[1] == present.numel():  # the runtime compacts inside the decoder: full rows here
        slot = torch.arange(present.numel())
    assert pruned_x.shape[1] in (present.numel(), int(present.sum()))
    for j, vector in expected.items():
        x = pruned_x[row, int(slot[int(pos[j])])]
        want = feats.view(64, -1)[j] if vector is None else vector
        torch.testing.assert_close(x.float(), want.float(), rtol=1e-4, atol=1e-5)


def test_llava_next_newlines_are_kept_and_counted():
    model = tiny.llava_next()
    kw = tiny.inputs("llava_next", model, [1], seed=7, sizes=[(64, 64)])
    from vtprune.integrations.llava_next import LlavaNextAdapter

    spec = LlavaNextAdapter(model)._spec([64, 64])
    start = int(torch.nonzero(kw["input_ids"][0] == tiny.IMAGE)[0])
    for plan in (dict(keep=0.25), dict(keep=0.25, cell=3)):
        with torch.no_grad(), vtprune.pruned(model, "vflowopt", **plan):
            model(**kw)
            kept = set(vtprune.stats(model).selections["vflowopt"][0].tolist())
        assert {start + o for o in spec.newline_offsets} <= kept
        assert len(kept) == int(0.25 * spec.num_tokens + 0.5)


def test_options_are_checked():
    with pytest.raises(ValueError, match=r"'threshold'=0 is invalid; allowed: a finite number > 0"):
        vtprune.VFlowOpt(threshold=0)
    with pytest.raises(ValueError, match=r"'cell'=0.5 is invalid; allowed: None or a finite number >= 1"):
        vtprune.VFlowOpt(cell=0.5)
    model = tiny.llava()
    with pytest.raises(ValueError, match=r"'layer'=7 is out of range"):
        vtprune.apply(model, "vflowopt", layer=7)


def test_tune_searches_the_vflowopt_schedule(tmp_path):
    model = tiny.qwen2_vl()
    samples = [tiny.inputs("qwen2_vl", model, [1, 1], seed=8)]
    r = vtprune.tune(
        model, "vflowopt", samples, keep=0.25, trials=3, seed=0, out=tmp_path / "v.json", progress=False
    )
    assert len(r.trials) == 3 and all(t["feasible"] for t in r.trials)
    assert set(r.trials[1]["options"]) == {"threshold", "cell", "layer"}
    plan = vtprune.load_plan(tmp_path / "v.json")
    with torch.no_grad(), vtprune.pruned(model, plan):
        model(**samples[0])
        assert vtprune.stats(model).keep_ratio == pytest.approx(0.25, rel=0.02)


def test_composes_with_a_later_pyramid_drop():
    """VFlowOpt's vision stage then a PyramidDrop boundary: the official method's shape (tower
    importance first, decoder drops later)."""
    model = tiny.llava()
    kw = tiny.inputs("llava", model, [1], seed=9)
    plan = vtprune.Compose(vtprune.VFlowOpt(keep=0.5, cell=2), vtprune.PyramidDrop(layers=[4], ratio=0.5))
    with torch.no_grad(), vtprune.pruned(model, plan):
        model(**kw)
        st = vtprune.stats(model)
    assert st.visual_tokens_per_layer == [32] * 4 + [16] * 4
    assert set(st.selections["pdrop@4"][0].tolist()) <= set(st.selections["vflowopt"][0].tolist())
