"""FlowCut on LLaVA-NeXT: crops as tower rows, survivors through unpadding and newlines, the
second prune at LLM layer 1; plain references of both rules, shared tables, accounting."""

from __future__ import annotations

import math

import pytest
import tiny
import torch
from helpers import eager_clip_layer, image_runs, shared_tables

import vtprune
from vtprune.integrations.llava_next import LlavaNextAdapter

TOWER = 8  # feature layer 6: pruning after tower layers 1, 3 and 5
SIZES = [(40, 64), (64, 64), (64, 40)]  # 1 x 2 crops, unpadded to 12 of 16 columns; 2 x 2; 2 x 1, unpadded


@pytest.fixture(scope="module")
def next_model():
    return tiny.llava_next(tower_layers=TOWER)


def plan_targets(model, spec, keep: float) -> list[int]:
    """The patches each crop of an image keeps: 2k of the image's shown patches, k solving the
    layer average with layers 0-1 at 2k, split over the crops by their shown patches."""
    layers = model.config.text_config.num_hidden_layers
    per_crop = LlavaNextAdapter(model).tower_tokens_per_crop
    shown = torch.bincount(spec.source[spec.source >= 0] // per_crop, minlength=spec.crops)
    total = int(shown.sum())
    k = max(1, math.floor(keep * spec.num_tokens * layers / (layers + 2) + 0.5))
    budget = min(total, 2 * k)
    ends = [math.floor(budget * int(c) / total + 0.5) for c in shown.cumsum(0)]
    return [b - a for a, b in zip([0] + ends[:-1], ends)]


def crop_rule(model, pixels: torch.Tensor, target: int, shown: torch.Tensor):
    """FlowCut's CLIP loop on one crop, plainly with the full eager attention matrix, where only
    the ``shown`` patches (tower tokens 1..) count towards the target and the rest leave with the
    crop's first drop. Returns (kept patches 0-based, projected features of the kept patches)."""
    tower = model.model.vision_tower
    vm = getattr(tower, "vision_model", tower)
    h = vm.pre_layrnorm(vm.embeddings(pixels))
    layers = vm.encoder.layers
    select_layer = len(layers) - 2
    kept = torch.arange(h.shape[1] - 1)
    cumulative = None
    for idx, layer in enumerate(layers[:select_layer]):
        h, q, k, v, weights = eager_clip_layer(layer, h)  # weights: [1, H, T, T]
        cls_att = weights[:, :, 0, 1:].mean(1)[0]
        semantic = torch.softmax(v[:, :, :1] @ v.transpose(-1, -2), dim=-1).mean(1)[0, 0, 1:]
        density = v.mean(1)[0, 1:].abs().sum(-1)
        score = (cls_att / cls_att.sum() + semantic / semantic.sum()) * density
        cumulative = score if cumulative is None else 0.5 * cumulative + 0.5 * score
        rpl = select_layer - idx - 1
        if rpl % 2:
            continue
        is_shown = shown[kept]
        n = int(is_shown.sum())
        if rpl:
            prob = cls_att / cls_att.sum()
            ratio = -torch.xlogy(prob, prob).sum() / math.log(cls_att.numel())
            drop = int(((n - target) / rpl**0.5 * (1 - ratio**2)).round())
            count = min(max(n - drop, target), n)
        else:
            count = min(target, n)
        ranked = torch.where(is_shown, cumulative, float("-inf")).argsort(descending=True, stable=True)
        top = ranked[:count]
        if count == n:
            top = torch.cat([top, torch.nonzero(~is_shown).flatten()])
        top = top.sort().values
        h = torch.cat([h[:, :1], h[:, 1:][:, top]], dim=1)
        cumulative, kept = cumulative[top], kept[top]
    out = layers[select_layer](h, None)
    h = out[0] if isinstance(out, tuple) else out
    return kept, model.model.multi_modal_projector(h[0, 1:])


@pytest.mark.parametrize("keep", [0.3, 0.11])
def test_survivors_reach_their_placeholders_with_their_features(next_model, keep):
    """The packed features of each image: every crop's survivors (the plain rule) at the cells
    unpadding and newlines put them, zeros at the dropped patches, newlines gone once anything drops."""
    model = next_model
    kw = tiny.inputs("llava_next", model, [3], seed=7, sizes=SIZES)
    adapter = LlavaNextAdapter(model)
    per_crop = adapter.tower_tokens_per_crop
    with torch.no_grad(), vtprune.pruned(model, "flowcut", keep=keep):
        packed = model.model.get_image_features(
            pixel_values=kw["pixel_values"],
            image_sizes=kw["image_sizes"],
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
        ).pooler_output
        model(**kw)
        selection = vtprune.stats(model).selections["flowcut"][0]
    with torch.no_grad():
        for i, size in enumerate(SIZES):
            spec = adapter._spec(list(size))
            targets = plan_targets(model, spec, keep)
            expect = torch.zeros(spec.num_tokens, packed[i].shape[-1])
            kept_tokens = torch.zeros(spec.num_tokens, dtype=torch.bool)
            for c, target in enumerate(targets):
                mine = (spec.source >= 0) & (spec.source // per_crop == c)
                shown = torch.zeros(per_crop - 1, dtype=torch.bool)
                shown[spec.source[mine] % per_crop - 1] = True
                kept, feats = crop_rule(model, kw["pixel_values"][i, c : c + 1], target, shown)
                at = {int(p) + 1 + c * per_crop: j for j, p in enumerate(kept)}
                for t in torch.nonzero(mine).flatten().tolist():
                    j = at.get(int(spec.source[t]))
                    if j is not None:
                        expect[t], kept_tokens[t] = feats[j], True
            assert kept_tokens.sum() < (spec.source >= 0).sum()
            patches = spec.source >= 0
            torch.testing.assert_close(packed[i][patches], expect[patches], rtol=1e-4, atol=1e-5)
            _, pos = image_runs(kw["input_ids"])[i]
            got = torch.isin(pos, selection)
            assert torch.equal(got, kept_tokens), i  # newlines dropped, the survivors' placeholders kept


def llm_rule(model, hidden, cos, sin, visual, count: int) -> torch.Tensor:
    """FlowCut's official decoder-layer-1 score for one row, with layer 1's input written out:
    repeated key/value heads, softmax over the visual keys, top-``count`` slots in order."""
    layer = model.model.language_model.layers[1]
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    hd, h, hkv = (
        attn.head_dim,
        model.config.text_config.num_attention_heads,
        model.config.text_config.num_key_value_heads,
    )
    q = attn.q_proj(x).view(1, -1, h, hd).transpose(1, 2)
    k = attn.k_proj(x).view(1, -1, hkv, hd).transpose(1, 2)
    v = attn.v_proj(x).view(1, -1, hkv, hd).transpose(1, 2)

    def rot(t):
        half = t.shape[-1] // 2
        return t * cos[:, None] + torch.cat([-t[..., half:], t[..., :half]], -1) * sin[:, None]

    q, k = rot(q), rot(k)
    k, v = k.repeat_interleave(h // hkv, 1), v.repeat_interleave(h // hkv, 1)
    vis = torch.nonzero(visual).flatten()
    rel = torch.softmax(q[0, :, -1:] @ k[0, :, vis].transpose(1, 2) / math.sqrt(hd), -1).mean(0)[0]
    sem = torch.softmax(v[0, :, -1:] @ v[0, :, vis].transpose(1, 2) / math.sqrt(hd), -1).mean(0)[0]
    score = (rel / rel.sum() + sem / sem.sum()) * v[0, :, vis].mean(0).abs().sum(-1)
    return vis[torch.topk(score, count).indices.sort().values]


@pytest.mark.parametrize("keep", [0.3, 0.11])
def test_layer_one_prune_equals_the_official_score(next_model, keep):
    model = next_model
    kw = tiny.inputs("llava_next", model, [2], seed=9, sizes=SIZES[:2])
    seen = {}

    def spy(module, args, kwargs):
        seen["hidden"] = args[0] if args else kwargs["hidden_states"]
        seen["rotary"] = kwargs["position_embeddings"]

    with torch.no_grad(), vtprune.pruned(model, "flowcut", keep=keep):
        handle = model.model.language_model.layers[1].register_forward_pre_hook(spy, with_kwargs=True)
        try:
            model(**kw)
        finally:
            handle.remove()
        st = vtprune.stats(model)
    tower, second = st.selections["flowcut"][0], st.selections["flowcut@2"][0]
    layers = model.config.text_config.num_hidden_layers
    n_prompt, n_in = st.visual_tokens_in, st.visual_tokens_per_layer[0]
    count = math.floor((keep * layers * n_prompt - 2 * n_in) / (layers - 2) + 0.5)
    assert st.visual_tokens_per_layer == [n_in] * 2 + [count] * (layers - 2)
    # the row is unpadded: layer 1's slots are the prompt positions that survived the tower
    ids = kw["input_ids"][0]
    slots = torch.nonzero((ids != tiny.IMAGE) | torch.isin(torch.arange(ids.numel()), tower)).flatten()
    visual = ids[slots] == tiny.IMAGE
    cos, sin = seen["rotary"]
    with torch.no_grad():
        expect = slots[llm_rule(model, seen["hidden"], cos, sin, visual, count)]
    assert torch.equal(second, expect)


def test_tower_tokens_fall_as_planned(next_model):
    model = next_model
    kw = tiny.inputs("llava_next", model, [1], seed=3, sizes=[(64, 64)])  # base + 2 x 2 crops
    spec = LlavaNextAdapter(model)._spec([64, 64])
    with torch.no_grad(), vtprune.pruned(model, "flowcut", keep=0.2):
        model(**kw)
        st = vtprune.stats(model)
    tower = st.tower_tokens_per_layer
    targets = plan_targets(model, spec, 0.2)
    assert len(tower) == TOWER and tower[:2] == [5 * 65] * 2  # layers 0 and 1 see every token
    assert all(a >= b for a, b in zip(tower, tower[1:]))  # entropy schedule: drops after 1, 3, 5
    assert tower[6:] == [sum(targets) + 5] * 2  # every crop's target + its CLS
    assert st.visual_tokens_per_layer[0] == sum(targets)  # the grid's newlines left with the drops


@pytest.mark.parametrize("keep", [0.5, 0.25, 0.11])
@pytest.mark.parametrize("sizes", [[(64, 64)], [(40, 64), (64, 40)]])
def test_keep_target_within_two_percent(next_model, keep, sizes):
    kw = tiny.inputs("llava_next", next_model, [len(sizes)], seed=1, sizes=sizes)
    with torch.no_grad(), vtprune.pruned(next_model, "flowcut", keep=keep):
        next_model(**kw)
        got = vtprune.stats(next_model).keep_ratio
    assert abs(got - keep) / keep <= 0.02, got


# -- the shared equivalence tables ---------------------------------------------------------------
(
    test_nothing_to_drop_equals_unpruned,
    test_remove_restores_the_model,
    test_cached_generate_equals_uncached,
    test_padded_batch_equals_rows_alone,
) = shared_tables("flowcut", {"llava_next": "next_model"}, plan=dict(keep=0.3))


def test_full_strategy_is_refused():
    model = tiny.llava_next()
    model.config.vision_feature_select_strategy = "full"
    with pytest.raises(NotImplementedError, match="vision_feature_select_strategy='default', not 'full'"):
        vtprune.apply(model, "flowcut")
    assert vtprune.api.handle_of(model) is None
