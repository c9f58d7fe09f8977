"""TransPrune: kept sets equal a plain eager re-run of the official rule; schedules, keep, composition."""

from __future__ import annotations

import pytest
import tiny
import torch
import torch.nn.functional as F
from helpers import count_hooks, row_alone

import vtprune
from vtprune.config import ModelInfo
from vtprune.flops import count_flops, decoder_linear_flops
from vtprune.stages import expected_tokens_per_layer


# -- the official rule, written plainly over an eager manual forward ------------------------
def official_ttv(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """``compute_transf_weight`` of the official code on one unpadded row ``[L, D]``."""
    ratio = torch.norm(after, dim=-1) / torch.norm(before, dim=-1)
    e = torch.exp(1 - F.cosine_similarity(before, after, dim=-1))
    return ratio * e / e.sum()


def lm_input(model, kw):
    """Layer 0's input and rotary tables of an unpruned forward (the manual run starts there)."""
    seen = {}

    def grab(module, args, kwargs):
        seen["h"] = args[0] if args else kwargs["hidden_states"]
        seen["rope"] = kwargs["position_embeddings"]

    handle = model.model.language_model.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**kw)
    finally:
        handle.remove()
    return seen["h"], seen["rope"]


@torch.no_grad()
def official_rule(model, kw, bounds, window, fractions, score="ttv+iga") -> dict[int, list[int]]:
    """Kept visual positions after each boundary, from a layer-by-layer eager forward of one row:
    TTV of both sub-layers summed over the window layers seen so far; IGA from the boundary
    layer's own eager attention weights (text rows after the image, mean over heads and rows);
    ``TTV / sum + IGA / sum``; the top ``round(f * N)`` stay (with their original positions)."""
    h, (cos, sin) = lm_input(model, kw)
    layers = model.model.language_model.layers
    ids = kw["input_ids"][0]
    visual = ids == model.config.image_token_id
    n_vis = int(visual.sum())
    first_text = int(torch.nonzero(visual).max()) + 1
    pos = torch.arange(ids.numel())  # original position of each slot still present
    ttv = torch.zeros(ids.numel())
    kept = {}
    for i, layer in enumerate(layers):
        n = pos.numel()
        mask = torch.full((n, n), torch.finfo(h.dtype).min).triu(1)[None, None]
        rope = (cos.index_select(-2, pos), sin.index_select(-2, pos))
        if i in bounds:
            vis = visual[pos]
            s = torch.zeros(n)
            if score != "iga":
                s += torch.where(vis, ttv[pos], 0) / (torch.where(vis, ttv[pos], 0).sum() + 1e-8)
            if score != "ttv":
                _, weights = layer.self_attn(
                    hidden_states=layer.input_layernorm(h), position_embeddings=rope, attention_mask=mask
                )
                iga = weights[0].float().mean(0)[pos >= first_text].mean(0)
                s += torch.where(vis, iga, 0) / (torch.where(vis, iga, 0).sum() + 1e-8)
            k = int(fractions[bounds.index(i)] * n_vis + 0.5)
            top = torch.nonzero(vis).flatten()[torch.topk(s[vis], k).indices]
            keep_slot = ~vis
            keep_slot[top] = True
            kept[i] = pos[top].sort().values.tolist()
            h, pos = h[:, keep_slot], pos[keep_slot]
            n = pos.numel()
            mask = torch.full((n, n), torch.finfo(h.dtype).min).triu(1)[None, None]
            rope = (cos.index_select(-2, pos), sin.index_select(-2, pos))
        x = layer.input_layernorm(h)
        a, _ = layer.self_attn(hidden_states=x, position_embeddings=rope, attention_mask=mask)
        h = h + a
        y = layer.post_attention_layernorm(h)
        m = layer.mlp(y)
        h = h + m
        if i in window:
            ttv[pos] += official_ttv(x[0].float(), a[0].float()) + official_ttv(y[0].float(), m[0].float())
    return kept


SIZES = {"llava": None, "llava_next": [(32, 64)] * 2, "qwen2_vl": [(16, 16)] * 2}
OPTS = [
    dict(layers=[2, 4, 6], ratios=[0.875, 0.625, 0.125], window=[1, 2, 3, 4, 5]),
    dict(keep=0.35),
    dict(layers=[2, 5], ratios=[0.5, 0.25], window=[0, 1, 3], score="ttv"),
    dict(layers=[3], ratios=[0.3], score="iga"),
]


@pytest.mark.parametrize("family", sorted(SIZES))
@pytest.mark.parametrize("opts", OPTS, ids=["official", "keep", "ttv", "iga"])
def test_kept_sets_equal_the_official_rule_row_by_row(family, opts):
    """A left-padded batch of one-image rows: each row keeps, at every boundary, what the plain
    eager re-run keeps on that row alone (per-row softmax: the batch does not mix rows)."""
    model = tiny.BUILDERS[family](attn="eager")
    kw = tiny.inputs(family, model, [1, 1], side="left", seed=23, sizes=SIZES[family])
    if family not in tiny.QWEN:  # positions from the first real token, as generate gives them
        kw["position_ids"] = (kw["attention_mask"].cumsum(1) - 1).clamp(min=0)
    cfg = vtprune.TransPrune(**opts)
    bounds, window, fractions = cfg.resolve(ModelInfo(num_layers=tiny.LAYERS, family=family))
    with torch.no_grad(), vtprune.pruned(model, cfg):
        model(**kw)
        sel = vtprune.stats(model).selections
    for b in range(2):
        alone = row_alone(family, kw, b, [1, 1])
        offset = int((kw["attention_mask"][b] == 0).sum())
        want = official_rule(model, alone, bounds, window, fractions, cfg.score)
        for layer in bounds:
            assert (sel[f"transprune@{layer}"][b] - offset).tolist() == want[layer], (b, layer)


def test_official_schedule_and_low_budgets_on_32_layers():
    info = ModelInfo(num_layers=32, family="llava")
    bounds, window, fractions = vtprune.TransPrune().resolve(info)
    stages = vtprune.TransPrune().stages(info)
    counts = expected_tokens_per_layer(stages, 576, 32)
    assert counts == [576] * 7 + [504] * 2 + [360] * 3 + [72] * 20  # 41% of N on average
    assert window == list(range(6, 12))
    for keep in (0.5, 0.25, 0.11):
        stages = vtprune.TransPrune(keep=keep).stages(info)
        got = sum(expected_tokens_per_layer(stages, 576, 32)) / 32 / 576
        assert abs(got - keep) / keep <= 0.02, (keep, got)
    assert vtprune.TransPrune(keep=0.11).resolve(info)[0] == [2, 4, 7]


@pytest.fixture(scope="module")
def shaped():
    return tiny.llava_shaped(), tiny.llava_shaped_inputs(seed=3)


@pytest.mark.parametrize("opts", [dict(), dict(keep=0.2, score="ttv")])
def test_tokens_per_layer_and_counted_flops_follow_the_schedule(shaped, opts):
    """LLaVA-1.5's geometry: the run holds the expected counts the FLOPs report uses, and the
    counted FLOPs fall by the decoder projections on the dropped tokens (less the instruction
    rows' small matmuls; the TTV reductions add none)."""
    model, kw = shaped
    cfg = model.config.text_config
    text = int(kw["attention_mask"].sum()) - 576

    def run(m, k):
        with torch.no_grad():
            return m(**k)

    full, _ = count_flops(run, model, kw)
    with vtprune.pruned(model, "transprune", **opts):
        pruned, _ = count_flops(run, model, kw)
        per_layer = vtprune.stats(model).visual_tokens_per_layer
    stages = vtprune.TransPrune(**opts).stages(ModelInfo(num_layers=32, family="llava"))
    assert per_layer == expected_tokens_per_layer(stages, 576, 32)
    expected = decoder_linear_flops(cfg, [576 + text] * 32) - decoder_linear_flops(
        cfg, [n + text for n in per_layer]
    )
    assert full - pruned == pytest.approx(expected, rel=0.03)
    if opts.get("score") == "ttv":  # norms and cosines only: no matmul beyond the model's own
        assert full - pruned == expected
    else:  # the instruction rows are the only extra matmuls
        assert full - pruned < expected


def test_composes_after_a_vision_stage():
    """divprune before the LLM, then transprune ranks what divprune kept (N = divprune's count)."""
    model = tiny.llava()
    kw = tiny.inputs("llava", model, [1, 2], seed=7)
    plan = vtprune.Compose(vtprune.DivPrune(keep=0.5), vtprune.TransPrune(layers=[2, 4], ratios=[0.5, 0.25]))
    with torch.no_grad(), vtprune.pruned(model, plan):
        model(**kw)
        st = vtprune.stats(model)
    first, second, third = (
        st.selections["divprune"],
        st.selections["transprune@2"],
        st.selections["transprune@4"],
    )
    for a, b, c in zip(first, second, third):
        assert set(c.tolist()) <= set(b.tolist()) <= set(a.tolist())
        assert b.numel() == round(0.5 * a.numel()) and c.numel() == round(0.25 * a.numel())
    assert st.visual_tokens_per_layer == [48, 48, 24, 24, 12, 12, 12, 12]  # the mean over rows


def test_ttv_needs_no_attention_weights_and_hooks_only_the_window():
    """SDPA stays; score='ttv' adds no attention-row work; sub-layer hooks sit on the window only
    and leave nothing behind."""
    model = tiny.llava(attn="sdpa")
    before = count_hooks(model)
    lm = model.model.language_model
    with vtprune.pruned(
        model, "transprune", layers=[3, 5], ratios=[0.5, 0.25], window=[1, 2, 4], score="ttv"
    ):
        assert model.config.text_config._attn_implementation == "sdpa"
        hooked = [i for i, layer in enumerate(lm.layers) if layer.mlp._forward_hooks]
        assert hooked == [1, 2, 4]
        assert all(
            bool(layer.self_attn._forward_hooks) == (i in (1, 2, 4)) for i, layer in enumerate(lm.layers)
        )
        assert not any(layer.self_attn.q_proj._forward_hooks for layer in lm.layers)
    assert count_hooks(model) == before


@pytest.mark.parametrize(
    "opts,message",
    [
        (
            dict(layers=[2, 4], ratios=[0.5, 0.2], window=[1, 4]),
            r"'window'=\[1, 4\] is out of range; allowed: layers in 0..3",
        ),
        (dict(layers=[2, 4], ratios=[0.5, 0.2], window=[3]), r"starts after the first boundary 2"),
        (dict(layers=[8], ratios=[0.5]), r"'layers'=8 is out of range; allowed: an integer in 1..7"),
        (dict(keep=0.1, layers=[2, 4, 6]), r"keep=0.1 is unreachable with layers=\[2, 4, 6\]"),
    ],
)
def test_options_that_depend_on_the_model_are_named(opts, message):
    with pytest.raises(ValueError, match=message):
        vtprune.TransPrune(**opts).stages(ModelInfo(num_layers=8, family="llava"))
