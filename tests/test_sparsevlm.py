"""SparseVLM: kept sets and recycled states equal a plain re-run of the official v1.5 rule."""

from __future__ import annotations

import pytest
import tiny
import torch

import vtprune
from vtprune.clustering import cluster_means, dpc_knn
from vtprune.config import ModelInfo
from vtprune.methods.sparsevlm import recycled_clusters
from vtprune.stages import expected_tokens_per_layer


# -- DPC-kNN against a direct loop of the official rule ---------------------------------------
def dpc_loop(x: torch.Tensor, n: int):
    """SparseVLM's cluster_and_merge written token by token (ties: the earlier token is denser)."""
    m, d = x.shape
    dist = [[float(((x[i] - x[j]) ** 2).sum().sqrt()) / d**0.5 for j in range(m)] for i in range(m)]
    big = max(max(r) for r in dist)
    dens = []
    for i in range(m):
        near = sorted(dist[i])[:n]
        dens.append(torch.exp(-torch.tensor(sum(v * v for v in near) / n)).item())
    score = []
    for i in range(m):
        denser = [dist[i][j] for j in range(m) if dens[j] > dens[i] or (dens[j] == dens[i] and j < i)]
        score.append((min(denser) if denser else big) * dens[i])
    centres = sorted(range(m), key=lambda i: (-score[i], i))[:n]
    labels = []
    for i in range(m):
        if i in centres:
            labels.append(centres.index(i))
        else:
            labels.append(min(range(n), key=lambda c: (dist[i][centres[c]], c)))
    means = [x[[i for i in range(m) if labels[i] == c]].mean(0) for c in range(n)]
    return centres, labels, torch.stack(means)


@pytest.mark.parametrize("m,n,seed", [(7, 1, 0), (23, 3, 1), (40, 4, 2), (61, 7, 3)])
def test_dpc_knn_equals_the_loop(m, n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, 16, generator=g)
    x[m // 2] = x[0]  # a duplicate: equal densities break by index
    centres, labels = dpc_knn(x, n)
    ref_c, ref_l, ref_means = dpc_loop(x, n)
    assert centres.tolist() == ref_c and labels.tolist() == ref_l
    torch.testing.assert_close(cluster_means(x, labels, n), ref_means)


def test_dpc_knn_rejects_bad_cluster_counts():
    with pytest.raises(ValueError, match="n_clusters=5 must be in 1..4"):
        dpc_knn(torch.zeros(4, 2), 5)


# -- the official rule re-run on a tiny model with eager attention --------------------------
def official_raters(embeds: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
    """Rater positions of one unpadded row: V = visual, T = the tokens after the image."""
    vpos = torch.nonzero(visual).flatten()
    tpos = torch.arange(int(vpos[-1]) + 1, visual.numel())
    m = (embeds[vpos] @ embeds[tpos].T).softmax(1).mean(0)
    return tpos[m > m.mean()]


def layer_hooks(layers, first_input: dict, outputs: dict) -> list:
    """Record layer 0's input (the LM input embeddings) and every decoder layer's output."""

    def pre(module, args, kwargs):
        first_input.setdefault("x", (args[0] if args else kwargs["hidden_states"]).clone())

    def post(i):
        return lambda module, args, out: outputs.__setitem__(
            i, (out[0] if isinstance(out, tuple) else out).clone()
        )

    hooks = [layers[0].register_forward_pre_hook(pre, with_kwargs=True)]
    return hooks + [layer.register_forward_hook(post(i)) for i, layer in enumerate(layers)]


def input_hooks(layers, inputs: dict) -> list:
    """Record what each layer receives (registered after ``apply``: after the pruning hooks)."""

    def pre(i):
        return lambda module, args, kwargs: inputs.__setitem__(
            i, (args[0] if args else kwargs["hidden_states"]).clone()
        )

    return [layer.register_forward_pre_hook(pre(i), with_kwargs=True) for i, layer in enumerate(layers)]


def _model(family):
    if family == "llava_shaped":  # 576 tokens: pruned sets large enough for several clusters
        model = tiny.llava_shaped()
        model.set_attn_implementation("eager")
        return model, tiny.llava_shaped_inputs(seed=5)
    model = tiny.BUILDERS[family](attn="eager")
    return model, tiny.inputs(family, model, [1], seed=5)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "llava_shaped"])
@pytest.mark.parametrize("recycle", [False, True])
def test_kept_sets_and_merges_equal_the_official_rule(family, recycle):
    """Eager attention of the pruned run (the official code's matrices) re-ranked by hand."""
    model, kw = _model(family)
    visual = kw["input_ids"][0] == model.config.image_token_id
    layers = model.model.language_model.layers
    first, outs, ins = {}, {}, {}
    hooks = layer_hooks(layers, first, outs)
    with torch.no_grad(), vtprune.pruned(model, "sparsevlm", keep=0.3, recycle=recycle):
        hooks += input_hooks(layers, ins)
        out = model(**kw, output_attentions=True)
        st = vtprune.stats(model)
    for h in hooks:
        h.remove()
    raters = official_raters(first["x"][0].float(), visual)
    depth = len(layers)
    rating, _ = vtprune.SparseVLM(keep=0.3).resolve(ModelInfo(num_layers=depth, family=family))
    present = torch.nonzero(visual).flatten()  # visual tokens (original positions) the layer sees
    text = torch.nonzero(~visual).flatten()
    for layer in rating:
        key = f"sparsevlm@{layer + 1}"
        slot = {int(p): i for i, p in enumerate(torch.cat([text, present]).sort().values)}
        attn = out.attentions[layer][0].float().mean(0)  # head mean, [L, L]
        rel = attn[[slot[int(t)] for t in raters]][:, [slot[int(p)] for p in present]].mean(0)
        kept = torch.as_tensor(st.selections[key][0])
        if not recycle:
            assert kept.tolist() == present[torch.topk(rel, kept.numel()).indices].sort().values.tolist(), key
            present = kept
            continue
        members = torch.as_tensor(st.selections[f"{key}:members"][0])
        centres = torch.as_tensor(st.selections[f"{key}:centres"][0])
        n_rel = kept.numel() - centres.unique().numel()
        top = torch.topk(rel, n_rel).indices
        pruned = torch.ones_like(rel, dtype=torch.bool)
        pruned[top] = False
        idx = torch.nonzero(pruned).flatten()
        m = int(idx.numel() * 0.3) + 1
        cand = present[idx[torch.sort(rel[idx], descending=True, stable=True).indices[:m]]]
        assert members.tolist() == cand.tolist(), key
        hidden = outs[layer][0]  # the rating layer's output at its own slots
        ref_c, ref_l, ref_means = dpc_loop(hidden[[slot[int(p)] for p in cand]].float(), m // 10 + 1)
        assert centres.tolist() == cand[[ref_c[c] for c in ref_l]].tolist(), key
        assert kept.tolist() == torch.cat([present[top], cand[ref_c]]).sort().values.tolist(), key
        # the next layer receives each cluster's mean in its centre's slot
        nxt = {int(p): i for i, p in enumerate(torch.cat([text, kept]).sort().values)}
        got = ins[layer + 1][0][[nxt[int(cand[c])] for c in ref_c]].float()
        torch.testing.assert_close(got, ref_means, rtol=1e-5, atol=1e-5)
        present = kept


# -- budgets, schedules and accounting ------------------------------------------------------
@pytest.mark.parametrize(
    "family,sizes",
    [("llava", None), ("llava_next", [(64, 64), (32, 64), (48, 64)]), ("qwen2_vl", [(32, 32), (24, 40)])],
)
@pytest.mark.parametrize(  # 8 layers: layer 0 sees everything, so keep > 1/8
    "keep,recycle", [(0.5, False), (0.25, False), (0.25, True)]
)
def test_keep_target_within_two_percent_on_every_family(family, sizes, keep, recycle):
    model = tiny.BUILDERS[family]()
    kw = tiny.inputs(family, model, [len(sizes) if sizes else 3], seed=13, sizes=sizes)
    with torch.no_grad(), vtprune.pruned(model, "sparsevlm", keep=keep, recycle=recycle):
        model(**kw)
        got = vtprune.stats(model).keep_ratio
    assert abs(got - keep) / keep <= 0.02, (family, keep, got)


@pytest.mark.parametrize("recycle", [False, True])
def test_keep_target_on_a_deep_qwen2_vl(recycle, keep=0.11):
    """LLaVA's depth on Qwen2-VL's merge groups: the lowest budget is reachable there (0.5 and
    0.25 on Qwen2.5-VL's: tests/test_accounting.py)."""
    model = tiny.qwen2_vl(num_hidden_layers=32)
    kw = tiny.inputs("qwen2_vl", model, [1], seed=13, sizes=[(32, 48)])
    with torch.no_grad(), vtprune.pruned(model, "sparsevlm", keep=keep, recycle=recycle):
        model(**kw)
        got = vtprune.stats(model).keep_ratio
    assert abs(got - keep) / keep <= 0.02, (keep, got)


@pytest.fixture(scope="module")
def shaped():
    return tiny.llava_shaped(), tiny.llava_shaped_inputs(seed=2)


@pytest.mark.parametrize(
    "opts", [dict(budget=64), dict(budget=192, recycle=True), dict(keep=0.2, recycle=True), dict(keep=0.11)]
)
def test_tokens_per_layer_follow_the_schedule(shaped, opts):
    """The official counts on LLaVA-1.5's geometry (3 full layers, then n1 x4, n2 x9, n3 x16), and
    the expected counts the FLOPs report uses equal what the run held."""
    model, kw = shaped
    with torch.no_grad(), vtprune.pruned(model, "sparsevlm", **opts):
        model(**kw)
        st = vtprune.stats(model)
    stages = vtprune.SparseVLM(**opts).stages(ModelInfo(num_layers=32, family="llava"))
    assert st.visual_tokens_per_layer == expected_tokens_per_layer(stages, 576, 32)
    if opts == dict(budget=64):
        assert st.visual_tokens_per_layer == [576] * 3 + [66] * 4 + [30] * 9 + [17] * 16
    if opts.get("budget") == 192:  # the clusters come on top of the official counts
        assert st.visual_tokens_per_layer[3] == 300 + recycled_clusters(276)


def test_schedule_resolution_and_scaling():
    info = ModelInfo(num_layers=32, family="llava")
    assert vtprune.SparseVLM().resolve(info)[0] == [2, 6, 15]
    assert vtprune.SparseVLM().boundaries(ModelInfo(num_layers=8, family="llava")) == [1, 2, 4]
    assert vtprune.SparseVLM().boundaries(ModelInfo(num_layers=28, family="qwen2_vl")) == [3, 6, 14]
    _, fr = vtprune.SparseVLM(keep=0.11).resolve(info)
    assert (3 + 4 * fr[0] + 9 * fr[1] + 16 * fr[2]) / 32 == pytest.approx(0.11)
    assert fr[0] / fr[2] == pytest.approx(66 / 17)  # the 64-token schedule's shape, scaled
    with pytest.raises(ValueError, match="keep=0.05 is unreachable"):
        vtprune.SparseVLM(keep=0.05).resolve(info)
    with pytest.raises(ValueError, match="'budget'=100 is invalid"):
        vtprune.SparseVLM(budget=100)
    with pytest.raises(ValueError, match="either 'keep' or 'budget'"):
        vtprune.SparseVLM(keep=0.2, budget=64)
    with pytest.raises(ValueError, match="out of range"):
        vtprune.SparseVLM(layers=[2, 6, 31]).resolve(info)


def test_composes_after_a_vision_stage(shaped):
    """divprune before the LLM, then sparsevlm rates what is left (raters from the pruned input)."""
    model, kw = shaped
    plan = vtprune.Compose(vtprune.DivPrune(keep=0.5), vtprune.SparseVLM(keep=0.25, recycle=True))
    with torch.no_grad(), vtprune.pruned(model, plan):
        model(**kw)
        st = vtprune.stats(model)
    vision = set(st.selections["divprune"][0].tolist())
    assert st.visual_tokens_per_layer[0] == 288
    assert set(st.selections["sparsevlm@16"][0].tolist()) <= vision
    assert st.visual_tokens_per_layer[-1] < st.visual_tokens_per_layer[3] < 288
