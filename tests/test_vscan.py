"""VScan: both stages against plain references of the official rules, accounting, composition."""

from __future__ import annotations

import pytest
import tiny
import torch
import torch.nn.functional as F
from helpers import image_runs, lm_view, unpruned_embeds

import vtprune
from vtprune.config import ModelInfo
from vtprune.methods.vscan import VScan


def official_merge(x: torch.Tensor, kept: list[int]) -> torch.Tensor:
    """The official ``token_merging`` written plainly: each unselected row goes to the kept row of
    largest cosine similarity; a kept row becomes (itself + its rows) / (1 + count)."""
    mask = torch.zeros(x.shape[0], dtype=torch.bool)
    mask[kept] = True
    kept_x, rest = x[mask], x[~mask]
    nearest = F.cosine_similarity(rest.unsqueeze(1), kept_x.unsqueeze(0), dim=2).argmax(1)
    out = kept_x.clone()
    count = torch.ones(kept_x.shape[0])
    for i, j in enumerate(nearest.tolist()):
        out[j] += rest[i]
        count[j] += 1
    return out / count.unsqueeze(1)


def test_llava_vision_stage_is_the_official_local_global_scan_and_merge():
    """LLaVA (8 x 8 tokens): head-mean CLS rows of the tower's own eager attention at the local
    (0) and global (feature, 1) layers; top 2 per 4 x 4 window (the official per-window top-k, the
    local count a multiple of the windows), then the global top 8 of the rest, then the official
    merge on the projector outputs."""
    model = tiny.llava(attn="eager")
    kw = tiny.inputs("llava", model, [1], seed=60)
    with torch.no_grad():
        tower = model.model.vision_tower(kw["pixel_values"], output_attentions=True)
    shallow = tower.attentions[0][0, :, 0, 1:].mean(0).view(8, 8)
    deep = tower.attentions[-2][0, :, 0, 1:].mean(0).clone()
    local = []
    for wi in range(2):
        for wj in range(2):
            block = shallow[wi * 4 : wi * 4 + 4, wj * 4 : wj * 4 + 4].reshape(-1)
            for t in block.topk(2).indices.tolist():
                local.append((wi * 4 + t // 4) * 8 + wj * 4 + t % 4)
    deep[local] = 0
    chosen = sorted(local + deep.topk(8).indices.tolist())
    ((row, pos),) = image_runs(kw["input_ids"])
    merged = official_merge(unpruned_embeds(model, kw)[row, pos], chosen)

    plan = VScan(keep=1 / 6, local_layer=0, window=4)  # 8 layers, prefill at 4: 16 of 64 after the tower
    seen, st = lm_view(model, kw, plan)
    assert st.selections["vscan-vision"][0].tolist() == pos[chosen].tolist()
    first = int(pos[0])
    torch.testing.assert_close(seen["embeds"][row, first : first + 16], merged, rtol=1e-5, atol=1e-6)


def _qwen_received(model, kw, blocks):
    """Official Qwen2.5-VL rule, plainly: at each block, the eager attention matrix over the image
    (in the tower's window order), summed over heads, averaged over queries and over each merge
    unit's 4 patches, then put back in token order with the inverse of the window index."""
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as hf

    tower = model.model.visual
    grabbed = {}

    def grab(i):
        def hook(module, args, kwargs):
            grabbed[i] = (args[0] if args else kwargs["hidden_states"], kwargs["position_embeddings"])

        return hook

    handles = [tower.blocks[i].register_forward_pre_hook(grab(i), with_kwargs=True) for i in blocks]
    try:
        with torch.no_grad():
            model(**kw)
    finally:
        for h in handles:
            h.remove()
    vc = model.config.vision_config
    window_index, _ = hf.get_vision_window_index(
        kw["image_grid_thw"],
        spatial_merge_size=vc.spatial_merge_size,
        window_size=vc.window_size,
        patch_size=vc.patch_size,
    )
    out = []
    for i in blocks:
        hidden, (cos, sin) = grabbed[i]
        blk = tower.blocks[i]
        attn = blk.attn
        x = blk.norm1(hidden)
        n = x.shape[0]
        q, k, _ = attn.qkv(x).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = hf.apply_rotary_pos_emb_vision(q, k, cos, sin)
        w = torch.softmax(q.transpose(0, 1) @ k.transpose(0, 1).transpose(1, 2) / q.shape[-1] ** 0.5, -1)
        per_unit = w.sum(0).mean(0).view(-1, 4).mean(1)
        out.append(per_unit[torch.argsort(torch.as_tensor(window_index))])
    return out


def test_qwen2_5_vl_vision_stage_is_the_official_window_selection_on_received_attention():
    """Qwen2.5-VL (full-attention blocks 0 and 2, the first and the last: the official pair; 8 x 8
    tokens): the official greedy window selection (cap ``ceil(n / windows)`` in 4 x 4 windows) on
    the first block's received attention, the global top of the rest on the last block's, merged."""
    model = tiny.qwen2_5_vl(attn="eager", fullatt=(0, 2))
    kw = tiny.inputs("qwen2_5_vl", model, [1], seed=61, sizes=[(16, 16)])
    local_scores, global_scores = _qwen_received(model, kw, [0, 2])
    _, vision, _ = VScan(keep=0.3).resolve(ModelInfo(num_layers=8, family="qwen2_5_vl"))
    n_keep = int(vision * 64 + 0.5)  # 29 of 64 after the tower: 0.3 * 8 / (4 + 4 / 3) = 0.45
    n_local, limit = n_keep // 2, -(-(n_keep // 2) // 4)
    counter, local = {}, []
    for t in torch.sort(local_scores, descending=True, stable=True).indices.tolist():
        w = (t // 8 // 4, t % 8 // 4)
        if counter.get(w, 0) < limit:
            counter[w] = counter.get(w, 0) + 1
            local.append(t)
        if len(local) == n_local:
            break
    deep = global_scores.clone()
    deep[local] = 0
    chosen = sorted(local + deep.topk(n_keep - n_local).indices.tolist())
    ((row, pos),) = image_runs(kw["input_ids"], tiny.IMAGE)
    merged = official_merge(unpruned_embeds(model, kw)[row, pos], chosen)

    seen, st = lm_view(model, kw, VScan(keep=0.3))
    assert st.selections["vscan-vision"][0].tolist() == pos[chosen].tolist()
    first = int(pos[0])
    torch.testing.assert_close(seen["embeds"][row, first : first + n_keep], merged, rtol=1e-5, atol=1e-6)


def test_prefill_stage_is_pyramid_drops_score_at_the_middle_layer():
    """Stage 2 (official ``layer_prune``): layer K's own norm and q/k on layer K-1's output, the last
    prompt row's softmax (mean over heads) onto the kept visual tokens; the count makes the layer
    average ``keep``."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model = tiny.llava(attn="eager")
    kw = tiny.inputs("llava", model, [1], seed=62)
    keep, layer = 0.2, 4
    seen, st = lm_view(model, kw, VScan(keep=keep))
    lm = model.model.language_model
    with torch.no_grad():
        out = lm(inputs_embeds=seen["embeds"], position_ids=seen["positions"], output_hidden_states=True)
        h = lm.layers[layer].input_layernorm(out.hidden_states[layer])  # layer K-1's output
        attn = lm.layers[layer].self_attn
        n, hd = h.shape[1], attn.head_dim
        q = attn.q_proj(h).view(1, n, -1, hd).transpose(1, 2)
        k = attn.k_proj(h).view(1, n, -1, hd).transpose(1, 2)
        positions = seen["positions"] if seen["positions"] is not None else torch.arange(n).unsqueeze(0)
        cos, sin = lm.rotary_emb(h, positions)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # GQA: K/V heads repeated
        w = torch.softmax((q[:, :, -1:] @ k.transpose(-1, -2)) * hd**-0.5, -1)[0, :, 0].mean(0)
    ids = kw["input_ids"][0]
    image = torch.nonzero(ids == tiny.IMAGE).flatten()
    vis = st.selections["vscan-vision"][0]
    present = torch.cat([torch.arange(image[0]), vis, torch.arange(image[-1] + 1, ids.numel())])
    local = torch.nonzero(torch.isin(present, vis)).flatten()
    n_layers, n1 = model.config.text_config.num_hidden_layers, vis.numel()
    k2 = int((keep * image.numel() * n_layers - layer * n1) / (n_layers - layer) + 0.5)
    expected = set(vis[w[local].topk(k2).indices].tolist())
    assert set(st.selections[f"vscan@{layer}"][0].tolist()) == expected
    assert st.visual_tokens_per_layer == [n1] * layer + [k2] * (n_layers - layer)


def test_defaults_are_the_papers_schedule():
    """keep 0.111 on 32 layers: 96 of 576 after the tower, 32 from layer 16 (64 on average); on a
    28-layer decoder 16.7% then a third of it from layer 14 (Qwen2.5-VL's defaults)."""
    layer, vision, split = VScan().resolve(ModelInfo(num_layers=32, family="llava"))
    assert (layer, int(vision * 576 + 0.5)) == (16, 96) and split == pytest.approx(1 / 3)
    layer, vision, _ = VScan().resolve(ModelInfo(num_layers=28, family="qwen2_5_vl"))
    assert layer == 14 and vision == pytest.approx(0.1665, abs=5e-4)
    # the windows: 6 on CLIP / SigLIP crops, 4 on Qwen's merged grid
    assert VScan().stages(ModelInfo(32, "llava"))[0].window == 6
    assert VScan().stages(ModelInfo(28, "qwen2_vl"))[0].window == 4


def test_tower_layers_default_to_layer_5_of_24_and_the_feature_layer():
    from vtprune.integrations import adapter_for

    model = tiny.qwen2_5_vl(fullatt=(0, 2))  # round(5 * 3 / 24) = 1 is a window block: the full block 0
    adapter = adapter_for(model)
    assert VScan().stages(ModelInfo(8, "qwen2_5_vl"))[0].vision_layers(adapter) == [0, 2]
    llava = adapter_for(tiny.llava())
    assert VScan().stages(ModelInfo(8, "llava"))[0].vision_layers(llava) == [1]  # 3 layers: both 1
    assert VScan(local_layer=-3).stages(ModelInfo(8, "llava"))[0].vision_layers(llava) == [0, 1]


@pytest.mark.parametrize(
    "family,sizes",
    [
        ("llava", None),
        ("llava_next", [(64, 64), (32, 64), (48, 64)]),
        ("qwen2_vl", [(32, 32), (24, 40)]),
        ("qwen2_5_vl", [(32, 32), (24, 40)]),
    ],
)
@pytest.mark.parametrize("keep", [0.5, 0.25])
def test_keep_is_the_layer_average_over_both_stages(family, sizes, keep):
    model = tiny.BUILDERS[family]()
    kw = tiny.inputs(family, model, [len(sizes) if sizes else 3], seed=63, sizes=sizes)
    with torch.no_grad(), vtprune.pruned(model, "vscan", keep=keep):
        model(**kw)
        got = vtprune.stats(model).keep_ratio
    assert abs(got - keep) / keep <= 0.02, (family, keep, got)


def test_llava_next_newlines_stay_and_merges_stay_inside_their_crop():
    model = tiny.llava_next()
    kw = tiny.inputs("llava_next", model, [1], seed=64, sizes=[(64, 64)])
    plan = VScan(keep=0.3)
    seen, st = lm_view(model, kw, plan)
    ((row, pos),) = image_runs(kw["input_ids"])
    from vtprune.integrations import adapter_for

    spec = adapter_for(model).image_specs(
        {"input_ids": kw["input_ids"], "pixel_values": kw["pixel_values"], "image_sizes": kw["image_sizes"]}
    )[0]
    newline = pos[list(spec.newline_offsets)]
    kept = st.selections["vscan-vision"][0]
    assert torch.isin(newline, kept).all()
    # merged embeddings: each kept token is the mean of members from its own crop only
    x = unpruned_embeds(model, kw)[row, pos]
    per_crop = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2 + 1
    crop_of = torch.where(spec.source >= 0, spec.source // per_crop, -1)
    local = torch.nonzero(torch.isin(pos, kept)).flatten()
    first = int(pos[0])
    got = seen["embeds"][row, first : first + local.numel()]
    for j in range(int(crop_of.max()) + 1):
        members = torch.nonzero(crop_of == j).flatten()
        mine = local[torch.isin(local, members)]
        if mine.numel() == 0 or mine.numel() == members.numel():
            continue
        expected = official_merge(x[members], torch.nonzero(torch.isin(members, mine)).flatten().tolist())
        torch.testing.assert_close(got[torch.isin(local, mine)], expected, rtol=1e-5, atol=1e-6)


def test_composes_with_a_later_pyramid_drop():
    model = tiny.llava()
    kw = tiny.inputs("llava", model, [1], seed=65)
    plan = vtprune.Compose(VScan(keep=0.25), vtprune.PyramidDrop(layers=[6], ratio=0.25))
    with torch.no_grad(), vtprune.pruned(model, plan):
        model(**kw)
        st = vtprune.stats(model)
    n1 = st.selections["vscan-vision"][0].numel()
    n2 = st.selections["vscan@4"][0].numel()
    assert st.visual_tokens_per_layer == [n1] * 4 + [n2] * 2 + [int(n1 * 0.25)] * 2
    assert set(st.selections["pdrop@6"][0].tolist()) <= set(st.selections["vscan@4"][0].tolist())


def test_counted_flops_match_the_tokens_per_layer_of_a_run():
    """The FLOPs estimate without a run (``expected_tokens_per_layer``) sees the run's tokens per
    layer, and the counted decoder FLOPs fall by the projections of the tokens gone."""
    from vtprune.flops import count_flops, decoder_linear_flops
    from vtprune.stages import expected_tokens_per_layer

    model = tiny.llava_shaped()
    kw = tiny.llava_shaped_inputs(seed=1)

    def run(m, k):
        with torch.no_grad():
            return m(**k)

    full, _ = count_flops(run, model, kw)
    with vtprune.pruned(model, "vscan") as handle:
        pruned, _ = count_flops(run, model, kw)
        st = vtprune.stats(model)
    per_layer = st.visual_tokens_per_layer
    assert per_layer == expected_tokens_per_layer(handle.stages, 576, 32) == [96] * 16 + [32] * 16
    text = int(kw["attention_mask"].sum()) - 576
    cfg = model.config.text_config
    expected = decoder_linear_flops(cfg, [576 + text] * 32) - decoder_linear_flops(
        cfg, [n + text for n in per_layer]
    )
    # the saving is the decoder's projections on the tokens gone, less the scans, merge and scorer
    assert full - pruned == pytest.approx(expected, rel=0.03)
    assert full - pruned < expected


def test_videos_and_mixed_prompts():
    """Qwen2.5-VL (window-permuted tower; Qwen2-VL shares the layout code): a clip is one unit (windows per frame) or, with ``video_budget="frame"``, each frame alone:
    keep-everything is the unpruned model, ``keep`` holds, and cached decoding equals uncached."""
    from helpers import greedy, uncached_greedy

    family = "qwen2_5_vl"
    model = tiny.BUILDERS[family]()
    kw = tiny.media_inputs(family, ["ivi", "v"], seed=66)
    with torch.no_grad():
        ref = model(**kw).logits
        with vtprune.pruned(model, "vscan", keep=1.0):
            assert torch.equal(model(**kw).logits, ref)
        for budget in ("clip", "frame"):
            with vtprune.pruned(model, "vscan", keep=0.25, video_budget=budget):
                model(**kw)
                assert abs(vtprune.stats(model).keep_ratio - 0.25) / 0.25 <= 0.02, budget
    one = tiny.media_inputs(family, ["ivi"], seed=67)
    with vtprune.pruned(model, "vscan", keep=0.3):
        cached = greedy(model, one, 4)
        assert torch.equal(cached, uncached_greedy(model, one, vtprune.stats(model).selections, 4))
