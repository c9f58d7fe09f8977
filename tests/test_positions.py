"""Kept tokens keep their original positions; LLaVA-NeXT newline tokens are handled explicitly."""

from __future__ import annotations

import pytest
import tiny
import torch

import vtprune
from vtprune import compat
from vtprune.integrations.llava_next import LlavaNextAdapter


def _capture_rotary(model, layer: int):
    seen = {}

    def hook(module, args, kwargs):
        seen.setdefault("cos", kwargs["position_embeddings"][0])

    return seen, model.model.language_model.layers[layer].register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize(
    "method, opts, layer", [("uniform", dict(keep=0.25), 0), ("pdrop", dict(ratio=0.5), 6)]
)
def test_qwen2_vl_kept_tokens_carry_original_3d_positions(method, opts, layer):
    model = tiny.qwen2_vl()
    kw = tiny.inputs("qwen2_vl", model, [1, 1], side="left", seed=7, sizes=[(16, 16), (8, 12)])
    mm = model.model
    positions, _ = mm.get_rope_index(
        kw["input_ids"],
        kw["mm_token_type_ids"],
        image_grid_thw=kw["image_grid_thw"],
        attention_mask=kw["attention_mask"],
    )
    x = torch.zeros(1, dtype=torch.float32)
    full_cos, _ = mm.language_model.rotary_emb(x, positions)
    seen, h = _capture_rotary(model, layer)
    with torch.no_grad(), vtprune.pruned(model, method, **opts):
        model(**kw)
        st = vtprune.stats(model)
    h.remove()
    assert st.visual_tokens_per_layer[layer] < st.visual_tokens_in
    cos = seen["cos"]
    for b in range(2):
        kept = torch.sort(st.selections[next(iter(st.selections))][b]).values
        # every kept visual token's rotary phase is the one of its original 3-D position
        row_cos = cos[b]
        orig = full_cos[b, kept]
        matches = (row_cos.unsqueeze(0) - orig.unsqueeze(1)).abs().amax(-1).min(1).values
        assert float(matches.max()) == 0.0


def test_qwen2_vl_visual_positions_are_really_3d():
    model = tiny.qwen2_vl()
    kw = tiny.inputs("qwen2_vl", model, [1], seed=8)
    pos, _ = model.model.get_rope_index(
        kw["input_ids"], kw["mm_token_type_ids"], image_grid_thw=kw["image_grid_thw"]
    )
    vis = kw["input_ids"][0] == tiny.IMAGE
    # height and width rows differ on visual tokens: the test above would catch a 1-D remap
    assert not torch.equal(pos[1, 0, vis], pos[2, 0, vis])


@pytest.mark.parametrize("size", [(32, 64), (64, 32), (64, 64), (40, 50), (32, 32)])
def test_llava_next_newline_layout_matches_hf_packing(size):
    model = tiny.llava_next()
    spec = LlavaNextAdapter(model)._spec(list(size))
    mm = model.model
    side = 8
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    n = image_size_to_num_patches(list(size), model.config.image_grid_pinpoints, 32)
    feats = (
        torch.arange(1, n * side * side + 1, dtype=torch.float32).view(n, side * side, 1).expand(-1, -1, 64)
    )
    newline = torch.full((64,), -1.0)
    packed, lens = mm.pack_image_features(
        [feats.clone()], torch.tensor([size]), "default", image_newline=newline
    )
    packed = packed[0][:, 0]
    assert packed.numel() == spec.num_tokens
    hf_newlines = torch.nonzero(packed == -1).flatten().tolist()
    assert hf_newlines == list(spec.newline_offsets)
    for seg in spec.segments:  # every grid cell of the layout is a patch token, not a newline
        assert bool((packed[seg.indices()] > 0).all())


@pytest.mark.parametrize("method", ["random", "uniform"])
def test_llava_next_newlines_kept_unless_asked(method):
    model = tiny.llava_next()
    kw = tiny.inputs("llava_next", model, [1], seed=9, sizes=[(64, 64)])
    spec = LlavaNextAdapter(model)._spec([64, 64])
    start = int(torch.nonzero(kw["input_ids"][0] == tiny.IMAGE)[0])
    newline_pos = {start + o for o in spec.newline_offsets}
    with torch.no_grad():
        with vtprune.pruned(model, method, keep=0.2):
            model(**kw)
            kept = set(vtprune.stats(model).selections[method][0].tolist())
        assert newline_pos <= kept
        with vtprune.pruned(model, method, keep=0.2, protect_newlines=False):
            model(**kw)
            kept = set(vtprune.stats(model).selections[method][0].tolist())
        assert len(newline_pos & kept) < len(newline_pos)


# -- silent traps (issue 13 item 5) ------------------------------------------------------------
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_prompt_without_mm_token_type_ids_is_refused(family):
    # transformers would silently fall back to 1-D positions, which the kept tokens would carry
    model = tiny.BUILDERS[family]()
    kw = tiny.inputs(family, model, [1], seed=21)
    types = kw.pop("mm_token_type_ids")
    with torch.no_grad(), vtprune.pruned(model, "uniform", keep=0.5):
        with pytest.raises(ValueError, match="mm_token_type_ids"):
            model(**kw)
        with pytest.raises(ValueError, match="mm_token_type_ids"):
            model(**kw, mm_token_type_ids=torch.zeros_like(types))  # placeholders marked as text
        model(**kw, mm_token_type_ids=types)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_gapped_positions_without_a_mask_are_not_read_as_packed_sequences(family):
    # kept tokens keep gapped original positions; with no attention mask and no cache,
    # transformers' mask helpers would split the row into block-diagonal "packed" sequences
    model = tiny.BUILDERS[family]()
    kw = tiny.inputs(family, model, [1], seed=22)
    mask = kw.pop("attention_mask")
    with torch.no_grad(), vtprune.pruned(model, "uniform", keep=0.25):
        bare = model(**kw, use_cache=False).logits
        masked = model(**kw, attention_mask=mask, use_cache=False).logits
    torch.testing.assert_close(bare, masked, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_decode_positions_follow_each_rows_rope_deltas(family):
    # a padded batch decoded by hand (no position_ids): each row's 3-D position must be its own
    # (real tokens so far + its rope_deltas), as transformers' generate computes it
    model = tiny.BUILDERS[family]()
    kw = tiny.inputs(family, model, [1, 2, 0], side="left", seed=23, sizes=[(8, 12), (8, 8), (12, 8)])
    seen = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda m, a, k: seen.append(k.get("position_ids")), with_kwargs=True
    )
    try:
        with torch.no_grad(), vtprune.pruned(model, "uniform", keep=0.3):
            model.generate(**kw, max_new_tokens=2, do_sample=False)
            expected = seen[-1][1:, :, -1]  # generate's [text; t; h; w] at the first decode step
            out = model(**kw)
            mask = torch.cat([kw["attention_mask"], torch.ones(3, 1, dtype=torch.long)], 1)
            model(
                input_ids=torch.full((3, 1), 5),
                attention_mask=mask,
                **compat.cache_kwargs(compat.output_cache(out)),
            )
    finally:
        hook.remove()
    assert (kw["attention_mask"] == 0).sum(1).tolist() != [0, 0, 0]  # rows really padded differently
    assert torch.equal(seen[-1][..., -1], expected)
