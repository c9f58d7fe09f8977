"""The tower scores and keys a vision stage composed with a tower stage reads for a survivor are the
values the tower computed at that survivor's slot *after* the drops: recomputed here plainly (full
softmax matrices) from the hidden states the attention module of the score layer really received,
and placed through the runner's own slot bookkeeping (``TOWER``'s ``index``/``valid``), then
compared with what VisionZip's view hands it (``cls_scores`` and ``keys`` at its score layer).

Per family what the runner's ``expand`` has to undo: LLaVA-NeXT, each crop a padded row and the
unpadded crop grid with newlines; Qwen2.5-VL, the window order (blocks run on a permuted patch
list); Qwen3-VL, plain merge groups; LLaVA-OneVision, padded SigLIP rows and the ``anyres_max``
downscaling / video pooling whose tokens mix surviving taps with renormalised weights."""

from __future__ import annotations

import sys

import pytest
import tiny
import torch
from helpers import image_runs
from test_flowcut_next import next_model  # noqa: F401 (fixtures)
from test_flowcut_onevision import ov_model  # noqa: F401
from test_flowcut_qwen3 import qwen3  # noqa: F401
from test_flowcut_qwen25 import qwen25  # noqa: F401
from transformers.vision_utils import get_vision_window_index

import vtprune
from vtprune.attention_graph import weighted_pagerank
from vtprune.integrations.llava_next import LlavaNextAdapter
from vtprune.integrations.llava_onevision import LlavaOnevisionAdapter, image_spec, video_spec
from vtprune.methods.visionzip import VisionZipStage
from vtprune.runtime.tower import TOWER


def _attention_modules(model):
    vm = model.model.vision_tower if hasattr(model.model, "vision_tower") else model.model.visual
    if hasattr(vm, "blocks"):
        return [b.attn for b in vm.blocks]
    vm = getattr(vm, "vision_model", vm)
    return [layer.self_attn for layer in vm.encoder.layers]


def run_and_record(model, kw, plan):
    """Run ``plan``; return VisionZip's views and, per tower layer, what its attention module got:
    ``(hidden, kwargs, index, valid)`` (the tower call's slots then; Qwen: ``valid`` is None)."""
    views, seen, handles = [], {}, []
    original = VisionZipStage.pick

    def spy(self, view, budget):
        views.append(view)
        return original(self, view, budget)

    def keep(i):
        def hook(module, args, kwargs):
            call = TOWER.get()
            hidden = args[0] if args else kwargs["hidden_states"]
            seen[i] = (
                hidden.detach().clone(),
                dict(kwargs),
                call.index.clone(),
                getattr(call, "valid", None),
            )

        return hook

    VisionZipStage.pick = spy
    try:
        with torch.no_grad(), vtprune.pruned(model, plan):
            for i, attn in enumerate(_attention_modules(model)):
                handles.append(attn.register_forward_pre_hook(keep(i), with_kwargs=True))
            model(**kw)
            st = vtprune.stats(model)
    finally:
        VisionZipStage.pick = original
        for h in handles:
            h.remove()
    assert st.tower_tokens_per_layer[-1] < st.tower_tokens_per_layer[0]
    return views, seen, st


def score_layer(view, depth):
    (layer,) = [k for k in view.layout.vision if isinstance(k, int)]
    return layer % depth


def local_tokens(view, ids):
    """The view's tokens as indices into its image's placeholder run."""
    for row, pos in image_runs(ids, tiny.IMAGE if view.kind == "image" else tiny.VIDEO):
        if row == view.row and bool(torch.isin(view.positions.cpu(), pos).all()):
            return torch.searchsorted(pos, view.positions.cpu())
    raise AssertionError("view not found")


def crop_rows_reference(attn, hidden, index, valid, per_crop: int, has_cls: bool, wpr: bool = False):
    """Per padded row of a CLIP / SigLIP tower batch, over its present slots only: the CLS row's
    probabilities summed over heads (CLS towers) or the attention each patch receives averaged over
    the heads and queries (SigLIP), and the head-mean keys; both at their original tower tokens."""
    rows = index.shape[0]
    score, keys = torch.zeros(rows, per_crop), torch.zeros(rows, per_crop, attn.head_dim)
    for r in range(rows):
        x = hidden[r, valid[r]]
        q = attn.q_proj(x).view(-1, attn.num_heads, attn.head_dim).transpose(0, 1)
        k = attn.k_proj(x).view(-1, attn.num_heads, attn.head_dim).transpose(0, 1)
        probs = torch.softmax(q @ k.transpose(-1, -2) * attn.scale, dim=-1)  # [H, n, n]
        if has_cls:
            got = probs[:, 0].sum(0)
        elif wpr:  # Zero-TPrune's weighted PageRank of the row's head-mean map
            got = weighted_pagerank(probs.mean(0))
        else:
            got = probs.mean(0).mean(0)
        score[r, index[r, valid[r]]] = got
        keys[r, index[r, valid[r]]] = k.mean(0)
    return score, keys


PLAN = vtprune.Compose(vtprune.FlowCut(keep=0.3), vtprune.VisionZip(keep=0.5))


def test_llava_next_crops_and_unpadding(next_model):  # noqa: F811
    model = next_model
    kw = tiny.inputs("llava_next", model, [2], seed=21, sizes=[(40, 64), (64, 64)])
    views, seen, _ = run_and_record(model, kw, PLAN)
    layers = _attention_modules(model)
    assert len(views) == 2
    hidden, _, index, valid = seen[score_layer(views[0], len(layers))]
    assert not bool(valid.all())  # crops kept different counts: padded rows
    per_crop = LlavaNextAdapter(model).tower_tokens_per_crop
    score, keys = crop_rows_reference(
        layers[score_layer(views[0], len(layers))], hidden, index, valid, per_crop, True
    )
    crop0 = 0
    for view in views:
        src = view.source.cpu()
        patch = src >= 0
        assert bool(view.newline.any()) is False  # a pruned image drops its newlines
        crop, tok = src[patch] // per_crop + crop0, src[patch] % per_crop
        layer = score_layer(view, len(layers))
        torch.testing.assert_close(
            view.cls_scores(layer).cpu()[patch], score[crop, tok], rtol=1e-5, atol=1e-6
        )
        torch.testing.assert_close(view.keys(layer).cpu()[patch], keys[crop, tok], rtol=1e-5, atol=1e-6)
        assert bool((score[crop, tok] > 0).all())  # every survivor was present at the score layer
        crop0 += view.crops


def _qwen_reference(attn, hidden, kwargs):
    """Received attention and head-mean keys per present patch (block order), per attention
    sequence of the block's ``cu_seqlens``, with the full softmax matrix."""
    rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb_vision
    n = hidden.shape[0]
    q, k, _ = attn.qkv(hidden).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = rope(q, k, *kwargs["position_embeddings"])
    score, keys = torch.zeros(n), torch.zeros(n, k.shape[-1])
    cu = kwargs["cu_seqlens"].tolist()
    for a, b in zip(cu[:-1], cu[1:]):
        qi, ki = q[a:b].transpose(0, 1), k[a:b].transpose(0, 1)
        probs = torch.softmax(qi @ ki.transpose(-1, -2) * attn.scaling, dim=-1)
        score[a:b] = probs.mean(0).mean(0)
        keys[a:b] = ki.mean(0)
    return score, keys


@pytest.mark.parametrize(
    "family,kind", [("qwen2_5_vl", "image"), ("qwen2_5_vl", "video"), ("qwen3_vl", "image")]
)
def test_qwen_merge_groups_in_token_order(request, family, kind):
    """Two images of one call, or a clip of two frames (each frame its own windows)."""
    model = request.getfixturevalue("qwen25" if family == "qwen2_5_vl" else "qwen3")
    if kind == "video":
        sizes = [(2 * 16, 16)]  # two 16 x 16 frames, one after the other in token order
        kw = tiny.media_inputs(family, ["v"], frames=2, seed=22, sizes=[(16, 16)])
        grid = kw["video_grid_thw"]
    else:
        sizes = [(8, 12), (16, 16)]
        kw = tiny.inputs(family, model, [2], seed=22, sizes=sizes)
        grid = kw["image_grid_thw"]
    views, seen, _ = run_and_record(model, kw, PLAN)
    layers = _attention_modules(model)
    layer = score_layer(views[0], len(layers))
    hidden, kwargs, index, _ = seen[layer]
    total = sum(h * w for h, w in sizes)
    assert index.numel() < total  # groups had left before the score layer
    ref, ref_keys = _qwen_reference(layers[layer], hidden, kwargs)
    patch = index  # block-order patch of each present slot
    if family == "qwen2_5_vl":  # blocks[i] = patches[order[i]]: back to token order
        vc = model.config.vision_config
        units, _ = get_vision_window_index(grid, vc.spatial_merge_size, vc.window_size, vc.patch_size)
        order = (torch.as_tensor(units).long().view(-1, 1) * 4 + torch.arange(4)).flatten()
        assert not torch.equal(order, torch.arange(total))  # the windows do permute this batch
        patch = order[index]
    full, full_keys = torch.zeros(total), torch.zeros(total, ref_keys.shape[-1])
    full[patch], full_keys[patch] = ref, ref_keys
    assert len(views) == len(sizes)
    start = 0
    for view, (h, w) in zip(views, sizes):
        units = start + local_tokens(view, kw["input_ids"])
        groups = units[:, None] * 4 + torch.arange(4)
        torch.testing.assert_close(view.cls_scores(layer).cpu(), full[groups].mean(1), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(view.keys(layer).cpu(), full_keys[groups].mean(1), rtol=1e-5, atol=1e-6)
        assert bool((full[groups] > 0).all())  # the survivors' patches were all present
        start += h * w // 4


@pytest.mark.parametrize("score", ["attention", "wpr"])
@pytest.mark.parametrize("kind", ["downscaled", "video"])
def test_onevision_taps_of_the_survivors(ov_model, kind, score):  # noqa: F811
    """A resampled token's score is its surviving taps' scores mixed with the renormalised weights
    (as its feature is); the tower computed them over each row's present patches only (the
    received attention, or the weighted PageRank of the row's map with ``score="wpr"``)."""
    model = ov_model
    plan = vtprune.Compose(vtprune.FlowCut(keep=0.3), vtprune.VisionZip(keep=0.5, score=score))
    if kind == "video":
        kw = tiny.media_inputs("llava_onevision", ["v"], frames=4, seed=23, cfg=model.config)
        spec = video_spec(model.config, 4)
    else:
        kw = tiny.inputs("llava_onevision", model, [1], seed=23, sizes=[(120, 120)])
        spec = image_spec(model.config, [120, 120])
    views, seen, _ = run_and_record(model, kw, plan)
    layers = _attention_modules(model)
    (view,) = views
    layer = score_layer(view, len(layers))
    hidden, _, index, valid = seen[layer]
    assert not bool(valid.all())
    per_crop = LlavaOnevisionAdapter(model).tower_tokens_per_crop
    wpr = score == "wpr"
    score, keys = crop_rows_reference(layers[layer], hidden, index, valid, per_crop, False, wpr)
    alive = torch.zeros_like(score, dtype=torch.bool)
    for r in range(index.shape[0]):
        alive[r, index[r, valid[r]]] = True
    local = local_tokens(view, kw["input_ids"])
    idx, w = (t[local] for t in spec.taps)
    at = (idx // per_crop, idx % per_crop)
    live = w * alive[at]
    assert bool(((live > 0) != (w > 0)).any())  # some survivor mixes a dropped tap
    weights = live / live.sum(1, keepdim=True)
    expect = (weights * score[at]).sum(1)
    expect_keys = (weights[..., None] * keys[at]).sum(1)
    got = view.cls_scores(layer, "wpr" if wpr else "attention").cpu()
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(view.keys(layer).cpu(), expect_keys, rtol=1e-5, atol=1e-6)
