"""Zero-TPrune: the rule as a plain reference (eager map, looped PageRank and similarity), the
shared tables on both families tower stages run on, accounting and refusals."""

from __future__ import annotations

import math

import pytest
import tiny
import torch
from helpers import (
    attention_input,
    eager_clip_layer,
    image_runs,
    llava_encoder_flops,
    merger_index,
    qwen_tower_qk,
    shared_tables,
)

import vtprune
from vtprune.flops import tower_linear_flops

TOWER = 8  # tower layers of the tiny LLaVA: feature layer 6, default pruning after layer 5


# -- the plain reference ------------------------------------------------------------------------
def loop_pagerank(attn: torch.Tensor, iterations: int) -> list[float]:
    """``s_j <- sum_i A[i][j] s_i`` from ``1/n``, written as loops over plain lists."""
    a = attn.tolist()
    n = len(a)
    s = [1.0 / n] * n
    for _ in range(iterations):
        s = [sum(a[i][j] * s[i] for i in range(n)) for j in range(n)]
    return s


def loop_two_stages(scores: list[float], keys: list[list[float]], keep: int, similarity: float) -> list[int]:
    """Indices kept: the least important leave, then the most redundant of the less important."""
    n = len(scores)
    r = n - keep
    r_s = max(0, min(r, math.floor(similarity * keep + 0.5), keep - 1))
    order = sorted(range(n), key=lambda i: (-scores[i], i))
    survivors = order[: n - (r - r_s)]
    half = len(survivors) // 2
    group_a, group_b = survivors[:half], survivors[half:]

    def cos(x, y):
        dot = sum(p * q for p, q in zip(x, y))
        return dot / (math.sqrt(sum(p * p for p in x)) * math.sqrt(sum(q * q for q in y)))

    best = {b: max(cos(keys[b], keys[a]) for a in group_a) for b in group_b}
    rank = {b: i for i, b in enumerate(group_b)}
    gone = sorted(group_b, key=lambda b: (-best[b], -rank[b]))[:r_s]
    return sorted(set(survivors) - set(gone))


def step_target(n: int, target: int, step: int, steps: int) -> int:
    if step == steps:
        return target
    return max(target, min(n, math.floor(n * (target / n) ** (step / steps) + 0.5)))


def loop_crop_step(scores, keys, kept, shown, n0: int, target: int, step: int, steps: int) -> list[int]:
    """One pruning step on a crop whose patches the language model does not all show (LLaVA-NeXT's
    unpadding, LLaVA-OneVision's resampling): the picks among the ``shown`` patches only (``scores``
    and ``keys`` per slot of ``kept``); the others stay while the crop drops none of its shown
    ones. The slots kept, sorted."""
    cand = [i for i, p in enumerate(kept) if shown[p]]
    count = 0 if n0 == 0 else min(len(cand), step_target(n0, target, step, steps))
    picked = loop_two_stages([scores[i] for i in cand], [keys[i] for i in cand], count, 0.5)
    chosen = [cand[i] for i in picked]
    if count >= len(cand):
        chosen += [i for i, p in enumerate(kept) if not shown[p]]
    return sorted(chosen)


def clip_reference(model, pixels, target, layers, iterations=30, similarity=0.5) -> list[int]:
    """The rule on one image, the tower run plainly with its full eager attention matrices."""
    tower = model.model.vision_tower
    vm = getattr(tower, "vision_model", tower)
    h = vm.pre_layrnorm(vm.embeddings(pixels))
    kept = list(range(h.shape[1] - 1))  # patch ids, CLS excluded
    n0 = len(kept)
    for idx, layer in enumerate(vm.encoder.layers):
        h, q, k, v, weights = eager_clip_layer(layer, h)  # weights: [1, H, T, T]
        if idx not in layers:
            continue
        scores = loop_pagerank(weights[0].mean(0), iterations)[1:]
        keys = k[0].mean(0)[1:].tolist()
        count = step_target(n0, target, layers.index(idx) + 1, len(layers))
        chosen = loop_two_stages(scores, keys, count, similarity)
        h = torch.cat([h[:, :1], h[:, 1:][:, chosen]], dim=1)
        kept = [kept[i] for i in chosen]
    return kept


def picks(model, kw, method="zerotprune") -> list[list[int]]:
    """Each image's kept tokens (local indices), in the order of the images."""
    selection = vtprune.stats(model).selections[method]
    out = []
    for row, pos in image_runs(kw["input_ids"]):
        out.append(torch.nonzero(torch.isin(pos, selection[row].to(pos.device))).flatten().tolist())
    return out


@pytest.fixture(scope="module")
def llava():
    return tiny.llava(tower_layers=TOWER)


@pytest.mark.parametrize(
    "options",
    [
        dict(keep=0.3),
        dict(keep=0.11, layers=[2, 5]),
        dict(keep=0.25, layers=[0], similarity=1.0, iterations=3),
    ],
)
def test_kept_sets_equal_the_plain_reference(llava, options):
    kw = tiny.inputs("llava", llava, [1, 2], seed=7)
    layers = options.get("layers", [TOWER - 3])
    extra = {k: options[k] for k in ("iterations", "similarity") if k in options}
    with torch.no_grad(), vtprune.pruned(llava, "zerotprune", **options):
        llava(**kw)
        got = picks(llava, kw)
        target = round(options["keep"] * 64)
        for i in range(len(got)):
            ref = clip_reference(llava, kw["pixel_values"][i : i + 1], target, layers, **extra)
            assert got[i] == ref, i
            assert len(got[i]) == target


def test_the_similarity_stage_changes_the_picks(llava):
    """similarity=0 keeps the top of the PageRank order; the default removes near-duplicates."""
    kw = tiny.inputs("llava", llava, [1], seed=7)
    with torch.no_grad():
        with vtprune.pruned(llava, "zerotprune", keep=0.25, similarity=0.0):
            llava(**kw)
            alone = picks(llava, kw)[0]
        with vtprune.pruned(llava, "zerotprune", keep=0.25):
            llava(**kw)
            both = picks(llava, kw)[0]
    assert len(alone) == len(both) == 16 and alone != both


def test_tower_tokens_per_layer(llava):
    kw = tiny.inputs("llava", llava, [2], seed=3)
    with torch.no_grad(), vtprune.pruned(llava, "zerotprune", keep=0.25, layers=[1, 4]):
        llava(**kw)
        st = vtprune.stats(llava)
    # 64 -> 32 (geometric half-way) after layer 1 -> 16 after layer 4; CLS counted
    assert st.tower_tokens_per_layer == [65, 65, 33, 33, 33, 17, 17, 17]
    assert st.visual_tokens_per_layer == [32] * tiny.LAYERS  # two images in the row


# -- shared equivalence tables ------------------------------------------------------------------
QWEN_SIZES = [(16, 16), (8, 12), (12, 16)]


@pytest.fixture(scope="module")
def qwen():
    return tiny.qwen2_vl(tower_depth=5)


(
    test_nothing_to_drop_equals_unpruned,
    test_remove_restores_the_model,
    test_cached_generate_equals_uncached,
    test_padded_batch_equals_rows_alone,
) = shared_tables("zerotprune", {"llava": "llava", "qwen2_vl": "qwen"}, plan=dict(keep=0.3, layers=[1, 3]))


# -- LLaVA-1.5 geometry: keep target and tower FLOPs ----------------------------------------------
@pytest.fixture(scope="module")
def shaped():
    from transformers import LlavaForConditionalGeneration

    from vtprune.eval.speed.shapes import llava_config

    torch.manual_seed(0)
    cfg = llava_config(
        32, 4, vision_hidden=16, heads=2, intermediate=64, vocab=tiny.VOCAB, image_token_id=tiny.IMAGE
    )
    cfg.vision_config.num_hidden_layers = TOWER
    model = LlavaForConditionalGeneration(cfg).eval()
    return model, tiny.llava_shaped_inputs(seed=1)


# tests/test_accounting.py's KEEP_METHODS table runs families tower stages are refused on, and its
# LLaVA-1.5 geometry has a one-layer tower: the keep target is checked here (flowcut does the same)
@pytest.mark.parametrize("layers", [None, [1, 4]])
@pytest.mark.parametrize("keep", [0.5, 0.25, 0.11])
def test_keep_target_within_two_percent(shaped, keep, layers):
    model, kw = shaped
    with torch.no_grad(), vtprune.pruned(model, "zerotprune", keep=keep, layers=layers):
        model(**kw)
        st = vtprune.stats(model)
    assert abs(st.keep_ratio - keep) / keep <= 0.02, st.keep_ratio
    assert st.tower_tokens_per_layer[-1] == round(keep * 576) + 1


def test_counted_tower_flops_fall_by_the_tokens_removed(shaped):
    model, kw = shaped
    mm, vc = model.model, model.config.vision_config
    full, pruned, tower = llava_encoder_flops(model, kw, "zerotprune", keep=0.25, layers=[1])
    assert tower == [577, 577] + [145] * (TOWER - 2)
    proj = sum(p.numel() for n, p in mm.multi_modal_projector.named_parameters() if n.endswith("weight"))
    removed = tower_linear_flops(vc, [577] * TOWER) - tower_linear_flops(vc, tower) + 2 * (576 - 144) * proj
    # the scoring's counted matmuls: the map's q.k^T (every head, 577 x 577), the CLS row the
    # tower context always carries, and the S-stage's cosines (the 144 + 72 survivors of the
    # I-stage split 108 / 108); PageRank's matrix-vector steps are no matmuls to the counter
    h, head_dim = vc.num_attention_heads, vc.hidden_size // vc.num_attention_heads
    scoring = 2 * h * 577 * 577 * head_dim + 2 * h * 577 * head_dim + 2 * 108 * 108 * head_dim
    saving = full - pruned
    assert saving == pytest.approx(removed - scoring, rel=0.01)


# -- Qwen2-VL: whole merge groups, the reference on patches --------------------------------------
def qwen_last_block_maps(model, kw) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per image, ``(head-mean attention [n, n], head-mean keys [n, d])`` of the tower's last
    block, from that block's own input in an unpruned run, with the full eager map."""
    attn = model.model.visual.blocks[-1].attn
    seen = attention_input(model, kw, attn)  # unpruned: no plan on the model
    bounds = seen["cu"].tolist()
    q, k = qwen_tower_qk(attn, seen["x"], seen["rope"])
    out = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        qi, ki = q[a:b].transpose(0, 1).float(), k[a:b].transpose(0, 1).float()  # [H, n, d]
        weights = torch.softmax(qi @ ki.transpose(-1, -2) * attn.scaling, dim=-1)
        out.append((weights.mean(0), ki.mean(0)))
    return out


def qwen_reference(model, kw, target_of, iterations=30, similarity=0.5) -> list[list[int]]:
    """The rule on each image at the last block (the default); the kept tokens (2x2 groups)."""
    out = []
    for attn, keys in qwen_last_block_maps(model, kw):
        s = loop_pagerank(attn, iterations)
        scores = [sum(s[i : i + 4]) for i in range(0, len(s), 4)]
        unit_keys = keys.view(-1, 4, keys.shape[-1]).mean(1).tolist()
        out.append(loop_two_stages(scores, unit_keys, target_of(len(scores)), similarity))
    return out


@pytest.mark.parametrize("fixture", ["qwen", "sharp_qwen"])
@pytest.mark.parametrize("keep", [0.3, 0.11])
def test_qwen_kept_sets_equal_the_plain_reference(request, fixture, keep):
    """On the random tiny tower (a nearly uniform map) and on one with sharpened q/k, where the
    PageRank graph decides the ranking rather than summation order."""
    model = request.getfixturevalue(fixture)
    kw = tiny.inputs("qwen2_vl", model, [1, 2], seed=5, sizes=QWEN_SIZES)
    ref = qwen_reference(model, kw, lambda units: max(1, math.floor(keep * units + 0.5)))
    with torch.no_grad(), vtprune.pruned(model, "zerotprune", keep=keep):
        model(**kw)
        assert picks(model, kw) == ref


def test_qwen_merge_groups_stay_whole(qwen):
    kw = tiny.inputs("qwen2_vl", qwen, [1, 2], seed=5, sizes=QWEN_SIZES)
    index, st = merger_index(qwen, kw, "zerotprune", keep=0.2, layers=[0, 2])
    groups = index.view(-1, 4)
    kept = round(0.2 * 64) + round(0.2 * 24) + round(0.2 * 48)
    assert groups.shape[0] == kept
    assert torch.equal(groups - groups[:, :1], torch.arange(4).expand_as(groups))
    assert torch.equal(groups[:, 0] % 4, torch.zeros_like(groups[:, 0]))
    # per image on average: block 0 on every patch, blocks 1-2 on the half-way count, 3-4 on `kept`
    tower = st.tower_tokens_per_layer
    assert tower[0] == (64 + 24 + 48) * 4 / 3 > tower[1] == tower[2] > tower[3] == tower[4] == kept * 4 / 3
    assert st.visual_tokens_per_layer[0] == kept / 2


@pytest.mark.parametrize("keep", [0.5, 0.25, 0.11])
def test_qwen_keep_target_within_two_percent(qwen, keep):
    kw = tiny.inputs("qwen2_vl", qwen, [1], seed=1, sizes=[(32, 32)])  # 256 tokens
    with torch.no_grad(), vtprune.pruned(qwen, "zerotprune", keep=keep, layers=[1, 4]):
        qwen(**kw)
        got = vtprune.stats(qwen).keep_ratio
    assert abs(got - keep) / keep <= 0.02, got


def test_composes_with_a_prefill_stage(llava):
    kw = tiny.inputs("llava", llava, [1], seed=2)
    plan = vtprune.Compose(vtprune.ZeroTPrune(keep=0.5, layers=[2]), vtprune.FastV(layer=2, ratio=0.5))
    with torch.no_grad(), vtprune.pruned(llava, plan):
        llava(**kw)
        st = vtprune.stats(llava)
    assert st.visual_tokens_per_layer == [32, 32] + [16] * (tiny.LAYERS - 2)
    assert st.tower_tokens_per_layer == [65] * 3 + [33] * (TOWER - 3)


# -- refusals and named errors ------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llava", "llava_onevision"])
def test_several_feature_layers_are_refused_clearly(family):
    """Every family runs zerotprune now; a tower whose features concatenate layers cannot."""
    model = tiny.BUILDERS[family]()
    model.config.vision_feature_layer = [-2, -1]
    with pytest.raises(
        NotImplementedError, match="zerotprune prunes inside the vision tower, which needs one"
    ):
        vtprune.apply(model, "zerotprune")
    assert vtprune.api.handle_of(model) is None


def test_a_layer_at_or_after_the_feature_layer_is_named(llava):
    with pytest.raises(ValueError, match=r"zerotprune: option 'layers'=\[2, 6\] is out of range"):
        vtprune.apply(llava, "zerotprune", layers=[2, 6])
    assert vtprune.api.handle_of(llava) is None


@pytest.mark.parametrize(
    "option,value,allowed",
    [
        ("similarity", 1.5, r"a number in \[0, 1\]"),
        ("iterations", 0, "an integer >= 1"),
        ("layers", [3, 1], "strictly increasing"),
    ],
)
def test_bad_options_are_named(option, value, allowed):
    with pytest.raises(ValueError, match=rf"zerotprune: option '{option}'=.*{allowed}"):
        vtprune.ZeroTPrune(**{option: value})


# -- the CLS-free score of the vision methods (score="wpr") ------------------------------------
def wpr_top(model, kw, count_of) -> list[list[int]]:
    """Per image, the tokens with the highest weighted PageRank (mean over each 2x2 group) of the
    last block's head-mean map: looped PageRank on the full eager map."""
    out = []
    for attn, _ in qwen_last_block_maps(model, kw):
        s = loop_pagerank(attn, 30)
        units = [sum(s[i : i + 4]) / 4 for i in range(0, len(s), 4)]
        order = sorted(range(len(units)), key=lambda i: (-units[i], i))
        out.append(sorted(order[: count_of(len(units))]))
    return out


@pytest.fixture(scope="module")
def sharp_qwen():
    """Random tiny weights give a nearly uniform map, where one PageRank step (the received
    attention) already ranks like thirty; sharper q/k in the last block make the graph matter."""
    model = tiny.qwen2_vl(tower_depth=5)
    attn = model.model.visual.blocks[-1].attn
    with torch.no_grad():
        attn.qkv.weight[: 2 * attn.qkv.weight.shape[1]] *= 6
    return model


@pytest.mark.parametrize(
    "method,options,count_of",
    [
        ("hired", dict(keep=0.25), lambda n: math.floor(0.25 * n + 0.5)),
        ("visionzip", dict(dominant=8, contextual=0), lambda n: 8),
    ],
)
def test_wpr_score_picks_the_pagerank_top(sharp_qwen, method, options, count_of):
    qwen = sharp_qwen
    kw = tiny.inputs("qwen2_vl", qwen, [1, 2], seed=5, sizes=QWEN_SIZES)
    ref = wpr_top(qwen, kw, count_of)
    with torch.no_grad():
        with vtprune.pruned(qwen, method, score="wpr", **options):
            qwen(**kw)
            wpr = picks(qwen, kw, method)
        with vtprune.pruned(qwen, method, **options):
            qwen(**kw)
            received = picks(qwen, kw, method)
    assert wpr == ref
    assert wpr != received  # the received-attention substitute ranks differently


def test_wpr_score_is_refused_on_a_tower_with_cls(llava):
    with pytest.raises(ValueError, match=r"hired: option 'score'='wpr' is invalid for this model"):
        vtprune.apply(llava, "hired", score="wpr")
    assert vtprune.api.handle_of(llava) is None


def test_wpr_score_name_is_checked():
    with pytest.raises(ValueError, match=r"visionzip: option 'score'='pagerank' is invalid"):
        vtprune.VisionZip(score="pagerank")
