"""HiRED and VisionZip: budget split, merging, and the vision-side scores they read."""

from __future__ import annotations

import pytest
import tiny
import torch

import vtprune
from vtprune import compat
from vtprune.images import GridSegment, ImageLayout, ImageView
from vtprune.methods.hired import HiRED, HiREDStage, crop_shares
from vtprune.methods.visionzip import VisionZip, zip_partition


def _next_like_image(side=4, grid=(2, 2)):
    """A hand-built LLaVA-NeXT-like image: base side x side, then a 2x2 crop grid, no unpadding."""
    rows, cols = grid[0] * side, grid[1] * side
    base = GridSegment(0, side, side, side, "base")
    crops = GridSegment(side * side, rows, cols, cols + 1, "crops")
    n = side * side + rows * (cols + 1)
    per_crop = 1 + side * side
    src = [1 + i for i in range(side * side)]
    newline = torch.zeros(n, dtype=torch.bool)
    for r in range(rows):
        for c in range(cols):
            crop = 1 + (r // side) * grid[1] + c // side
            src.append(crop * per_crop + 1 + (r % side) * side + c % side)
        src.append(-1)
        newline[side * side + r * (cols + 1) + cols] = True
    img = ImageLayout(row=0, positions=torch.arange(n), segments=[base, crops], newline=newline)
    img.source, img.crops = torch.tensor(src), 1 + grid[0] * grid[1]
    img.extra = {"crop_side": side, "crop_grid": grid}
    return img, per_crop


def test_hired_budget_split_on_hand_built_2x2_attention_map():
    img, per_crop = _next_like_image()
    # layer-0 CLS attention on the 4x4 base grid: 8 hot cells, 4 in the top-left quadrant,
    # 3 in the top-right, none bottom-left, 1 bottom-right
    hot = [(0, 0), (0, 1), (1, 0), (1, 1), (0, 2), (0, 3), (1, 2), (3, 3)]
    split = torch.zeros(5 * per_crop)
    for r, c in hot:
        split[1 + r * 4 + c] = 1.0
    select = torch.arange(5 * per_crop, dtype=torch.float32)
    img.vision = {0: {"cls": split.view(5, per_crop)}, 1: {"cls": select.view(5, per_crop)}}
    assert crop_shares(split[1:17], 4, (2, 2), 8) == [4, 3, 0, 1]
    stage = HiREDStage(HiRED(budget=0.25, alpha=0.5, split_layer=0, select_layer=1), 0.25)
    view = ImageView(img, tower_tokens_per_crop=per_crop)
    kept = stage.pick(view, stage.budget(view))
    # total = int(5 partitions * 16 * 0.25) = 20; the base gets int(20 * 0.5) = 10; the other 10
    # go 4:3:0:1 -> 5, 3.75, 0, 1.25 -> largest remainders -> 5, 4, 0, 1
    crop_of = torch.where(img.source >= 0, img.source // per_crop, -1)[kept]
    assert [int((crop_of == j).sum()) for j in range(5)] == [10, 5, 4, 0, 1]
    assert int(img.newline[kept].sum()) == int(img.newline.sum())  # newlines kept by default


def test_hired_stats_and_newline_option():
    model = tiny.llava_next()
    kw = tiny.inputs("llava_next", model, [1], seed=30, sizes=[(64, 64)])
    with torch.no_grad():
        with vtprune.pruned(model, "hired", budget=0.2, drop_newlines=True):
            model(**kw)
            kept = vtprune.stats(model).selections["hired"][0]
        ids = kw["input_ids"][0]
        start = int(torch.nonzero(ids == tiny.IMAGE)[0])
        from vtprune.integrations.llava_next import LlavaNextAdapter

        spec = LlavaNextAdapter(model)._spec([64, 64])
        newline_pos = {start + o for o in spec.newline_offsets}
        assert not newline_pos & set(kept.tolist())
        assert kept.numel() == int(5 * 64 * 0.2)


def test_visionzip_merge_groups_follow_key_similarity():
    scores = torch.tensor([9.0, 1, 2, 8, 3, 4, 0.5])
    keys = torch.tensor([[1.0, 0], [0, 1], [0, 1], [1, 0], [1, 0.1], [0.1, 1], [1, 0]])
    plan = zip_partition(scores, keys, dominant=2, contextual=2)
    # dominant: 0 and 3; the rest [1, 2, 4, 5, 6] gives targets 1 and 4 (every 5 // 2 = 2nd);
    # 2 and 5 point like target 1's key, 6 like target 4's
    assert plan.kept.tolist() == [0, 1, 3, 4]
    assert plan.targets.tolist() == [1, 4]
    assert [m.tolist() for m in plan.members] == [[2, 5], [6]]


@pytest.mark.parametrize("family,patches", [("llava", 5), ("qwen2_vl", 6)])
def test_visionzip_keeps_dominant_rows_unchanged(family, patches):
    """6 dominant + 2 contextual: on LLaVA the CLS token is one of the 6 dominant tokens (5 patch rows
    copied unchanged); Qwen2-VL has no CLS, so all 6 are patches."""
    model = tiny.BUILDERS[family]()
    kw = tiny.inputs(family, model, [1], seed=31)
    seen = {}

    def grab(module, args, kwargs):  # the first decoder layer's input is the LM input, as pruned
        seen["embeds"] = args[0] if args else kwargs["hidden_states"]

    lm = model.model.language_model
    with torch.no_grad():
        h = lm.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
        model(**kw)
        original = seen["embeds"][0]
        with vtprune.pruned(model, "visionzip", dominant=6, contextual=2):
            model(**kw)
            st = vtprune.stats(model)
        h.remove()
    assert st.visual_tokens_per_layer[0] == 8
    pruned = seen["embeds"][0]
    ids = kw["input_ids"][0]
    first = int(torch.nonzero(ids == tiny.IMAGE)[0])
    vis_orig = original[ids == tiny.IMAGE]
    exact = [bool((vis_orig == v).all(-1).any()) for v in pruned[first : first + 8]]
    assert sum(exact) == patches


def test_visionzip_counts_a_cls_placeholder_among_the_dominant_tokens():
    """With the "full" feature strategy the CLS token has its own placeholder: it stays there, as one
    of the dominant tokens, and no projected CLS feature is added into a freed slot."""
    model = tiny.llava(strategy="full")
    kw = tiny.inputs("llava", model, [1], seed=35)
    first = int(torch.nonzero(kw["input_ids"][0] == tiny.IMAGE)[0])
    for opts, n in [(dict(dominant=10, contextual=4), 14), (dict(keep=0.25), round(0.25 * 65))]:
        with torch.no_grad(), vtprune.pruned(model, "visionzip", **opts):
            model(**kw)
            kept = vtprune.stats(model).selections["visionzip"][0]
        assert kept.numel() == n and first in kept.tolist(), opts


def test_visionzip_options_are_validated():
    with pytest.raises(ValueError, match="merge.*'sum'.*official"):
        VisionZip(merge="sum")


def test_mustdrop_window_merge_on_hand_built_grid():
    from vtprune.methods.mustdrop import MustDrop, MustDropVisionStage

    side = 6
    img = ImageLayout(
        row=0,
        positions=torch.arange(36),
        segments=[GridSegment(0, side, side, side)],
        newline=torch.zeros(36, dtype=torch.bool),
    )
    img.source = torch.arange(36) + 1
    feats = torch.randn(37, 8, generator=torch.Generator().manual_seed(0))
    top_left = [1 + r * side + c for r in range(3) for c in range(3)]
    feats[top_left] = torch.tensor([1.0] * 8)  # identical features: similarity 1 in that window
    cls = torch.zeros(37)
    cls[1 + 5 * side + 5] = 1.0  # key token in the bottom-right window: that window never merges
    img.vision = {0: {"hidden": feats.unsqueeze(0)}, 3: {"cls": cls.unsqueeze(0)}}
    stage = MustDropVisionStage(MustDrop(key_ratio=0.02))  # ceil(0.02 * 35) = 1 key token
    view = ImageView(img, tower_tokens_per_crop=37, tower_layers=4)  # the key set reads layer 3
    kept, key_set, merges = stage.plan(view)
    assert key_set.tolist() == [35]
    assert len(merges) == 1 and merges[0][0] == 1 * side + 1  # the tile centre represents it
    assert sorted(merges[0][1].tolist()) == [r * side + c for r in range(3) for c in range(3)]
    assert kept.numel() == 36 - 8


def test_mustdrop_decode_stage_reindexes_earlier_caches():
    model = tiny.llava()
    kw = tiny.inputs("llava", model, [1], seed=32)
    with torch.no_grad():
        with vtprune.pruned(model, "mustdrop", keep=0.4, decode=False):
            plain = compat.output_cache(model(**kw))
            st = vtprune.stats(model)
        with vtprune.pruned(model, "mustdrop", keep=0.4):
            reindexed = compat.output_cache(model(**kw))
            st_dec = vtprune.stats(model)
    first, final = 2, st.kv_cache_lengths[-1]
    assert st_dec.kv_cache_lengths == st.kv_cache_lengths[:first] + [final] * (
        len(st.kv_cache_lengths) - first
    )
    assert st_dec.visual_tokens_per_layer == st.visual_tokens_per_layer  # prefill compute unchanged
    # layer 2's re-indexed cache holds exactly its own keys at the finally surviving positions
    ids = kw["input_ids"][0]
    kept_visual = set(st.selections[sorted(k for k in st.selections if "@" in k)[-1]][0].tolist())
    layer2_visual = sorted(st.selections["mustdrop@2"][0].tolist())
    text = torch.nonzero(ids != tiny.IMAGE).flatten().tolist()
    layer2_positions = sorted(text + layer2_visual)
    final_positions = sorted(text + sorted(kept_visual))
    rows = [layer2_positions.index(p) for p in final_positions]
    torch.testing.assert_close(reindexed.layers[2].keys, plain.layers[2].keys[:, :, rows], rtol=0, atol=0)


def _final_stage_positions(selections) -> list[torch.Tensor]:
    """Per row, the original positions of the visual tokens that survived the last prefill stage."""
    last = max((k for k in selections if "@" in k), key=lambda k: int(k.rsplit("@", 1)[1]))
    return selections[last]


def _decode_view_hooks(model, first_layer: int, prompt_len: int, final_positions):
    """Reference for the decode stage, without a cache: in layers ``first_layer``.., tokens after the
    prompt see only the visual tokens of the final set, as decoding from the re-indexed cache does.

    A pre-hook on each decoder layer (after the runtime's own) replaces the layer's mask with the
    causal mask of its token set minus (generated query, dropped visual key) pairs.
    """
    from vtprune.runtime.state import ACTIVE

    def hook_for(i):
        def hook(module, args, kwargs):
            state = ACTIVE.get()
            cur = state.sets[state.layer_set[i]]
            n = cur.length
            final = torch.zeros(cur.orig_index.shape, dtype=torch.bool)
            for b, pos in enumerate(final_positions):
                final[b] = torch.isin(cur.orig_index[b], pos)
            dropped = cur.visual & ~final
            generated = cur.orig_index >= prompt_len
            allowed = torch.ones(n, n, dtype=torch.bool).tril() & cur.valid[:, None, :]
            allowed &= ~(generated[:, :, None] & dropped[:, None, :])
            kwargs["attention_mask"] = allowed[:, None]
            return args, kwargs

        return hook

    layers = model.model.language_model.layers
    return [
        layers[i].register_forward_pre_hook(hook_for(i), with_kwargs=True)
        for i in range(first_layer, len(layers))
    ]


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl"])
def test_mustdrop_decode_stage_generate_equals_uncached_reference(family):
    from helpers import BANNED

    model = tiny.BUILDERS[family]()
    kw = tiny.inputs(family, model, [1], seed=33)
    prompt_len = kw["input_ids"].shape[1]
    with torch.no_grad(), vtprune.pruned(model, "mustdrop", keep=0.4):
        gen = model.generate(
            **kw,
            max_new_tokens=5,
            do_sample=False,
            suppress_tokens=BANNED,
            output_logits=True,
            return_dict_in_generate=True,
        )
        cached = torch.stack(gen.logits, 1)  # [1, 5, vocab]: raw logits of each decoding step
        st = vtprune.stats(model)
        first_layer = next(i for i, n in enumerate(st.kv_cache_lengths) if n == st.kv_cache_lengths[-1])
        ids = gen.sequences[:, :-1]
        call = dict(kw, input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
        if "mm_token_type_ids" in kw:
            mtt = kw["mm_token_type_ids"]
            call["mm_token_type_ids"] = torch.cat([mtt, mtt.new_zeros(1, ids.shape[1] - prompt_len)], 1)

        def uncached_logits():
            with vtprune.replay(st.selections):
                return model(**call).logits[:, prompt_len - 1 :]

        hooks = _decode_view_hooks(model, first_layer, prompt_len, _final_stage_positions(st.selections))
        try:
            reference = uncached_logits()
        finally:
            for h in hooks:
                h.remove()
        plain = uncached_logits()  # without the decode view: generated tokens see the prefill sets
    assert first_layer < len(st.kv_cache_lengths) - 1
    torch.testing.assert_close(cached, reference, rtol=1e-5, atol=1e-5)
    # the prompt's own last row is the same either way; later rows differ, so the check above can fail
    torch.testing.assert_close(cached[:, 0], plain[:, 0], rtol=1e-5, atol=1e-5)
    assert (cached[:, 1:] - plain[:, 1:]).abs().max() > 1e-3


def test_mustdrop_keep_moves_default_stages_earlier_on_shallow_models():
    from vtprune.config import ModelInfo
    from vtprune.methods.mustdrop import MustDrop, MustDropPrefillStage
    from vtprune.selection import pyramid_average

    def bounds(keep, n):
        return [
            s.layer
            for s in MustDrop(keep=keep).stages(ModelInfo(n, "llava"))
            if isinstance(s, MustDropPrefillStage)
        ]

    assert bounds(0.11, 32) == [3, 7, 11, 15]  # deep models: the scaled defaults, unchanged
    shallow = bounds(0.11, 12)
    assert shallow[0] == 1 and pyramid_average(shallow, 1e-6, 12) < 0.11
    with pytest.raises(ValueError, match="unreachable"):  # explicit layers are never moved
        MustDrop(keep=0.11, layers=[4, 6]).stages(ModelInfo(12, "llava"))


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl"])
def test_mustdrop_keep_counts_the_vision_merge_on_trained_models(arch):
    """On real scenes the window merge removes many background tokens before the LLM; with ``keep``
    the prefill stages re-solve their budgets per row so the layer average still hits the target."""
    from vtprune.eval.synthetic.synthvqa import build_prompt, generate_synthvqa
    from vtprune.eval.synthetic.tiny_models import load_tiny

    model, processor = load_tiny(arch)
    items = generate_synthvqa(4, seed=0, split="test")
    processor.tokenizer.padding_side = "left"
    enc = processor(
        images=[it["image"] for it in items],
        text=[build_prompt(it["question"], arch) for it in items],
        return_tensors="pt",
        padding=True,
    )
    for keep in (0.5, 0.25, 0.11):
        with torch.no_grad(), vtprune.pruned(model, "mustdrop", keep=keep):
            model(**enc)
            st = vtprune.stats(model)
        assert abs(st.keep_ratio - keep) < 0.02, (keep, st.keep_ratio)
        assert st.visual_tokens_per_layer[0] < st.visual_tokens_in  # the merge did remove tokens


@pytest.mark.parametrize("crop,patch", [(32, 8), (24, 8)])
@pytest.mark.parametrize("method", ["visionzip", "hired", "random", "uniform"])
def test_keep_is_met_on_llava_next_with_small_crops(crop, patch, method):
    """With 9-16 tokens per crop, per-crop rounding and the protected newline tokens must come out of
    the image's budget, not on top of it (VisionZip once kept 0.32 for keep 0.25 here)."""
    model = tiny.llava_next(crop=crop, patch=patch)
    for size in [(2 * crop, 2 * crop), (crop * 5 // 4, 2 * crop)]:
        kw = tiny.inputs("llava_next", model, [1], seed=34, sizes=[size])
        for keep in (0.5, 0.25, 0.11):
            with torch.no_grad(), vtprune.pruned(model, method, keep=keep):
                model(**kw)
                ratio = vtprune.stats(model).keep_ratio
            assert abs(ratio - keep) < 0.02, (size, keep, ratio)


def test_visionzip_keep_gives_the_papers_splits():
    """keep = 64/128/192 of 576 resolves to the papers' 54+10 / 108+20 / 162+30 (CLS among the dominant)."""
    for k, split in [(64, (54, 10)), (128, (108, 20)), (192, (162, 30))]:
        assert VisionZip(keep=k / 576).per_partition(576) == split
