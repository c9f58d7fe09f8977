"""DART: the pivot de-duplication block, the official rule as a plain reference, keep, composition."""

from __future__ import annotations

import sys

import pytest
import tiny
import torch
from helpers import count_hooks, image_runs, row_alone

import vtprune
from vtprune.config import ModelInfo
from vtprune.diversity import pivot_deduplication


def plain_deduplication(x, pivots, candidates, quota) -> list[int]:
    """The official per-pivot loop written plainly, one sequence: a Python pool, recomputed cosines."""
    pool = [j for j in range(x.shape[0]) if candidates[j]]
    picked: list[int] = []
    for p, q in zip(pivots, quota):
        if p < 0 or not pool:
            continue
        sim = torch.nn.functional.cosine_similarity(x[p].unsqueeze(0), x[pool], dim=-1)
        chosen = [pool[i] for i in torch.topk(-sim, min(q, len(pool))).indices.tolist()]
        picked += chosen
        pool = [j for j in pool if j not in chosen]
    return sorted(picked)


def test_deduplication_equals_the_plain_loop_on_a_padded_batch():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 40, 16, generator=gen)
    candidates = torch.rand(3, 40, generator=gen) > 0.3
    pivots = torch.tensor([[3, 17, 39, -1], [0, 1, 2, 5], [-1, -1, 8, 30]])
    quota = torch.tensor([[4, 2, 3, 9], [1, 7, 0, 2], [5, 5, 6, 40]])  # the last one outruns the pool
    got = pivot_deduplication(x, pivots, candidates, quota)
    for b in range(3):
        want = plain_deduplication(x[b], pivots[b].tolist(), candidates[b], quota[b].tolist())
        assert torch.nonzero(got[b]).flatten().tolist() == want
    assert not (got & ~candidates).any()
    assert int(got[2].sum()) == int(candidates[2].sum())  # row 2 asks for more than there is


def _captures(model, layer: int):
    """Pre-hooks keeping layer ``layer - 1``'s input and rotary tables and layer ``layer``'s input."""
    lm = model.model.language_model
    seen: dict = {}

    def before(module, args, kwargs):
        seen["h_prev"] = args[0] if args else kwargs["hidden_states"]
        seen["rope"] = kwargs["position_embeddings"]

    def at(module, args, kwargs):
        seen["h"] = args[0] if args else kwargs["hidden_states"]

    handles = [
        lm.layers[layer - 1].register_forward_pre_hook(before, with_kwargs=True),
        lm.layers[layer].register_forward_pre_hook(at, with_kwargs=True),
    ]
    return seen, handles


def official_rule(model, kw, layer: int, budget: int, n_img: int, n_txt: int) -> list[int]:
    """DART's ``get_retained_image_token`` on one unpadded one-image prompt, written plainly from an
    eager re-run: keys of layer K-1 (HF's own RoPE), L1 norms, the pivots, then per pivot the
    ``MAX // pivots`` least-similar tokens by cosine of ``norm(h_K)``. Pivots are walked in the
    order of the official list (image then text, each by descending norm), not its ``set``."""
    lm = model.model.language_model
    seen, handles = _captures(model, layer)
    try:
        with torch.no_grad():
            model(**kw)
    finally:
        for h in handles:
            h.remove()
    layer_prev = lm.layers[layer - 1]
    attn = layer_prev.self_attn
    rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
    with torch.no_grad():
        x = layer_prev.input_layernorm(seen["h_prev"])
        k = attn.k_proj(x).view(1, x.shape[1], -1, attn.head_dim).transpose(1, 2)
        _, k = rope(k, k, *seen["rope"])
        k = k.permute(0, 2, 1, 3).reshape(1, x.shape[1], -1)[0]
        normed = lm.norm(seen["h"])[0]
    (_, pos), *_ = image_runs(kw["input_ids"])
    start, length = int(pos[0]), pos.numel()
    k_img, k_txt = k[start : start + length], k[start + length :]
    image_idx = (torch.topk(k_img.abs().sum(-1), n_img).indices + start).tolist()
    query_idx = (torch.topk(k_txt.abs().sum(-1), n_txt).indices + start + length).tolist()
    topk = (budget - n_img) // (n_img + n_txt)  # MAX // pivots, MAX = budget - image pivots
    valid = [j for j in range(start, start + length) if j not in image_idx]
    kept = set(image_idx)
    for item in image_idx + query_idx:
        sim = -torch.nn.functional.cosine_similarity(normed[item].unsqueeze(0), normed[valid], dim=-1)
        chosen = [valid[i] for i in sim.topk(topk).indices.tolist()]
        kept.update(chosen)
        valid = [j for j in valid if j not in chosen]
    return sorted(kept)


SIZES = {"llava": None, "llava_next": [(32, 64)] * 2, "qwen2_vl": [(16, 16)] * 2, "qwen2_5_vl": [(8, 12)] * 2}


@pytest.mark.parametrize("family", sorted(SIZES))
@pytest.mark.parametrize("pivots", [(4, 4), (2, 3)])
def test_kept_set_equals_the_official_rule(family, pivots):
    """A left-padded batch of one-image rows, pruned at K=2: each row keeps what the official rule
    keeps on that row alone (ratio chosen so that MAX is a multiple of the pivot count, where the
    official per-pivot quota and this budget agree)."""

    n_img, n_txt = pivots
    model = tiny.BUILDERS[family]()
    kw = tiny.inputs(family, model, [1, 1], side="left", seed=21, sizes=SIZES[family])
    if family not in tiny.QWEN:
        # positions from the first real token, as generate gives them (and Qwen's rope index does):
        # the L1 norm of a rotated key depends on its position, so padding must not shift them
        kw["position_ids"] = (kw["attention_mask"].cumsum(1) - 1).clamp(min=0)
    n = image_runs(kw["input_ids"])[0][1].numel()
    per_pivot = max(1, n // 24)
    budget = per_pivot * (n_img + n_txt) + n_img
    opts = dict(ratio=budget / n, pivot_image=n_img, pivot_text=n_txt)
    with torch.no_grad(), vtprune.pruned(model, "dart", **opts):
        model(**kw)
        kept = vtprune.stats(model).selections["dart@2"]
    for b in range(2):
        alone = row_alone(family, kw, b, [1, 1])
        offset = int((kw["attention_mask"][b] == 0).sum())
        want = official_rule(model, alone, 2, budget, n_img, n_txt)
        assert len(want) == budget
        assert (kept[b] - offset).tolist() == want


@pytest.mark.parametrize(
    "family,sizes",
    [
        ("llava", None),
        ("llava_next", [(64, 64), (32, 64), (48, 64)]),
        ("qwen2_vl", [(32, 32), (24, 40)]),
        ("qwen2_5_vl", [(16, 24), (8, 12)]),
    ],
)
@pytest.mark.parametrize("keep", [0.5, 0.25])
def test_keep_target_within_two_percent_on_every_family(family, sizes, keep):
    model = tiny.BUILDERS[family]()
    n_images = len(sizes) if sizes else 3
    kw = tiny.inputs(family, model, [n_images], seed=13, sizes=sizes)
    with torch.no_grad(), vtprune.pruned(model, "dart", keep=keep):
        model(**kw)
        st = vtprune.stats(model)
    assert abs(st.keep_ratio - keep) / keep <= 0.02, (family, keep, st.keep_ratio)
    n, layers = st.visual_tokens_in, len(st.visual_tokens_per_layer)
    k, _ = vtprune.DART(keep=keep).resolve(ModelInfo(num_layers=layers, family=family))
    assert st.visual_tokens_per_layer[:k] == [n] * k  # layers before K see every token
    assert st.visual_tokens_per_layer[k] < n


def test_small_budget_keeps_only_image_pivots():
    """A budget below the image pivot count keeps that many of the best-key-norm tokens."""
    model = tiny.llava()
    kw = tiny.inputs("llava", model, [1], seed=5)
    with torch.no_grad(), vtprune.pruned(model, "dart", ratio=3 / 64):
        model(**kw)
        small = vtprune.stats(model).selections["dart@2"][0]
    with torch.no_grad(), vtprune.pruned(model, "dart", ratio=4 / 64, pivot_text=1):
        model(**kw)
        four = vtprune.stats(model).selections["dart@2"][0]
    assert small.numel() == 3 and four.numel() == 4
    assert set(small.tolist()) < set(four.tolist())  # the top-3 of the same key norms


def test_composes_after_a_vision_stage():
    """divprune before the LLM, then dart at layer 2 on what divprune kept."""
    model = tiny.llava()
    kw = tiny.inputs("llava", model, [1, 2], seed=7)
    plan = vtprune.Compose(vtprune.DivPrune(keep=0.5), vtprune.DART(ratio=0.5))
    with torch.no_grad(), vtprune.pruned(model, plan):
        model(**kw)
        st = vtprune.stats(model)
    first, second = st.selections["divprune"], st.selections["dart@2"]
    for a, b in zip(first, second):
        assert set(b.tolist()) <= set(a.tolist())
        assert b.numel() == round(0.5 * a.numel())
    assert st.visual_tokens_per_layer == [48, 48] + [24] * 6  # the mean over rows: (32 + 64) / 2


def test_needs_no_attention_weights():
    """The model keeps its SDPA attention (no eager switch, no wrapper) and the tower runs unhooked."""
    model = tiny.llava(attn="sdpa")
    tower = count_hooks(model.model.vision_tower)
    with vtprune.pruned(model, "dart", keep=0.5):
        assert model.config.text_config._attn_implementation == "sdpa"
        assert count_hooks(model.model.vision_tower) == tower


@pytest.mark.parametrize("family", tiny.QWEN)
def test_videos_and_mixed_media(family):
    """Qwen rows with images and videos (a left-padded mixed batch): keep-everything is exact, the
    keep target is met, and cached generation equals uncached steps replaying the selection."""
    from helpers import greedy, uncached_greedy

    model = tiny.BUILDERS[family]()
    batch = tiny.media_inputs(family, ["iv", "v", "", "i"], seed=1)
    with torch.no_grad():
        ref = model(**batch).logits
        with vtprune.pruned(model, "dart", keep=1.0):
            assert torch.equal(model(**batch).logits, ref)
    kw = tiny.media_inputs(family, ["ivi", "v"], seed=6)
    with torch.no_grad(), vtprune.pruned(model, "dart", keep=0.25):
        model(**kw)
        assert abs(vtprune.stats(model).keep_ratio - 0.25) < 0.02
    one = tiny.media_inputs(family, ["ivi"], seed=3)
    with vtprune.pruned(model, "dart", keep=0.5):
        cached = greedy(model, one, 4)
        reference = uncached_greedy(model, one, vtprune.stats(model).selections, 4)
    assert torch.equal(cached, reference)


def test_tokens_per_layer_and_counted_flops_on_llava_1_5_geometry():
    """576 tokens, 32 layers: the planned and the observed tokens per layer agree, and the counted
    FLOPs fall by the decoder projections on the dropped tokens (less DART's own small work)."""
    from vtprune.flops import count_flops, decoder_linear_flops
    from vtprune.stages import expected_tokens_per_layer

    model = tiny.llava_shaped()
    kw = tiny.llava_shaped_inputs(seed=1)
    cfg = model.config.text_config
    text = int(kw["attention_mask"].sum()) - 576

    def run(m, k):
        with torch.no_grad():
            return m(**k)

    full, _ = count_flops(run, model, kw)
    plan = vtprune.DART(keep=0.25)
    with vtprune.pruned(model, plan):
        pruned, _ = count_flops(run, model, kw)
        per_layer = vtprune.stats(model).visual_tokens_per_layer
    stages = plan.stages(ModelInfo(num_layers=32, family="llava"))
    assert per_layer == expected_tokens_per_layer(stages, 576, 32) == [576] * 2 + [115] * 30
    expected = decoder_linear_flops(cfg, [576 + text] * 32) - decoder_linear_flops(
        cfg, [n + text for n in per_layer]
    )
    assert full - pruned == pytest.approx(expected, rel=0.03)
    assert full - pruned < expected
