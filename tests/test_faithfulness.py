"""vtprune's kept sets (and merged embeddings) against plain eager re-computations of the official rules.

Each reference reads the tiny model's own weights with eager softmax attention (the towers' and
decoders' ``output_attentions``, or q/k recomputed by hand), follows the official code's rule
step by step, and never calls into vtprune; only where vtprune documents a decision (original
positions kept, newline tokens kept, where VisionZip's CLS token goes, HiRED's 2-D crop blocks and
largest-remainder split) does the reference follow the decision, and says so.
"""

from __future__ import annotations

import pytest
import tiny
import torch

import vtprune

# --------------------------------------------------------------------------------------------
# shared helpers


def _lm_inputs(model, kw, method=None, **options):
    """The language model's ``inputs_embeds`` and ``position_ids`` of one forward (pruned when a
    method is given: the hook runs after vtprune's, so it sees the compacted input)."""
    seen = {}

    def grab(module, args, kwargs):
        seen["embeds"], seen["positions"] = kwargs["inputs_embeds"], kwargs.get("position_ids")

    lm = model.model.language_model
    with torch.no_grad():
        if method is None:
            handle = lm.register_forward_pre_hook(grab, with_kwargs=True)
            try:
                model(**kw)
            finally:
                handle.remove()
            return seen, None
        with vtprune.pruned(model, method, **options):
            handle = lm.register_forward_pre_hook(grab, with_kwargs=True)
            try:
                model(**kw)
            finally:
                handle.remove()
            return seen, vtprune.stats(model)


def _image_slots(kw) -> torch.Tensor:
    return torch.nonzero(kw["input_ids"][0] == tiny.IMAGE).flatten()


def _top(scores: torch.Tensor, k: int) -> set[int]:
    return set(scores.topk(k).indices.tolist())


# --------------------------------------------------------------------------------------------
# FastV: the last query row of layer K-1's attention, mean over heads, top (1 - R) of the visual
# tokens (official: pkunlp-icler/FastV)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "qwen3_vl"])  # Qwen3: q_norm / k_norm
def test_fastv_keeps_the_official_set(family):
    model = tiny.BUILDERS[family](attn="eager")
    kw = tiny.inputs(family, model, [1], seed=40)
    layer, ratio = 2, 0.5
    with torch.no_grad():
        attn = model(**kw, output_attentions=True).attentions[layer - 1][0]  # [H, L, L]
    visual = _image_slots(kw)
    scores = attn[:, -1, visual].mean(0)
    expected = {int(visual[i]) for i in _top(scores, int(visual.numel() * ratio))}
    with torch.no_grad(), vtprune.pruned(model, "fastv", layer=layer, ratio=ratio):
        model(**kw)
        kept = vtprune.stats(model).selections[f"fastv@{layer}"][0]
    assert set(kept.tolist()) == expected


# --------------------------------------------------------------------------------------------
# PyramidDrop: at boundary b, layer b's input_layernorm + q/k projections + RoPE on layer b-1's
# output, the last token's softmax attention (fp32, K/V heads repeated), mean over heads; keep
# int(N * ratio**s) (official: Cooperx521/PyramidDrop). Decision: original positions are kept, so
# the reference runs each segment's decoder layers by hand on the kept tokens at their positions.


def _rotate(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)


def _last_token_attention(layer, h, cos, sin) -> torch.Tensor:
    """Layer ``layer``'s attention of the last token onto every token of ``h [1, L, D]``, mean over heads."""
    attn = layer.self_attn
    x = layer.input_layernorm(h)
    d = attn.head_dim
    q = attn.q_proj(x).view(1, x.shape[1], -1, d).transpose(1, 2)
    k = attn.k_proj(x).view(1, x.shape[1], -1, d).transpose(1, 2)
    q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    logits = (q[:, :, -1:].float() @ k.float().transpose(-1, -2)) * attn.scaling  # the last row sees all
    return torch.softmax(logits, dim=-1)[0, :, 0].mean(0)


def _pdrop_reference(model, kw, boundaries: list[int], ratio: float) -> list[set[int]]:
    lm = model.model.language_model
    seen, _ = _lm_inputs(model, kw)
    h = seen["embeds"]
    n = h.shape[1]
    pos = seen["positions"] if seen["positions"] is not None else torch.arange(n).view(1, n)
    slots = torch.arange(n)  # original positions of the tokens still present
    visual = torch.zeros(n, dtype=torch.bool)
    visual[_image_slots(kw)] = True
    n_visual = int(visual.sum())
    kept_sets = []
    with torch.no_grad():
        for i, layer in enumerate(lm.layers):
            cos, sin = lm.rotary_emb(h, pos[..., slots])
            if i in boundaries:
                s = boundaries.index(i) + 1
                scores = _last_token_attention(layer, h, cos, sin)
                vis_local = torch.nonzero(visual[slots]).flatten()
                top = vis_local[scores[vis_local].topk(int(n_visual * ratio**s)).indices]
                kept_sets.append(set(slots[top].tolist()))
                local = torch.nonzero(~visual[slots]).flatten()
                local = torch.cat([local, top]).sort().values
                h, slots = h[:, local], slots[local]
                cos, sin = lm.rotary_emb(h, pos[..., slots])
            causal = slots.view(1, -1) <= slots.view(-1, 1)
            mask = torch.zeros(causal.shape).masked_fill(~causal, torch.finfo(h.dtype).min)
            h = layer(h, attention_mask=mask[None, None], position_embeddings=(cos, sin))
            h = h[0] if isinstance(h, tuple) else h
    return kept_sets


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_pdrop_keeps_the_official_sets_at_every_boundary(family):
    model = tiny.BUILDERS[family](attn="eager")
    kw = tiny.inputs(family, model, [1], seed=41)
    boundaries, ratio = [2, 4, 6], 0.5
    expected = _pdrop_reference(model, kw, boundaries, ratio)
    with torch.no_grad(), vtprune.pruned(model, "pdrop", layers=boundaries, ratio=ratio):
        model(**kw)
        selections = vtprune.stats(model).selections
    got = [set(selections[f"pdrop@{b}"][0].tolist()) for b in boundaries]
    assert [len(s) for s in got] == [32, 16, 8]
    assert got == expected


# --------------------------------------------------------------------------------------------
# Tower side (HiRED, VisionZip): CLS attention from the tower's own eager attention maps


def _tower(model, pixel_values):
    """Eager tower outputs for ``pixel_values [crops, 3, H, W]``: hidden states and attentions."""
    with torch.no_grad():
        return model.model.vision_tower(pixel_values, output_hidden_states=True, output_attentions=True)


def _crops(kw) -> torch.Tensor:
    pv = kw["pixel_values"]
    return pv if pv.dim() == 4 else pv[0][pv[0].flatten(1).abs().sum(1) > 0]  # LLaVA-NeXT: real crops


def _slot_of(model, kw) -> dict[tuple[int, int], int]:
    """(crop, patch index within the crop) -> sequence position, from the model's own feature layout
    (LLaVA: one crop, row-major; LLaVA-NeXT: base, then the crop grid row by row, newline-separated)."""
    slots = _image_slots(kw).tolist()
    if kw["pixel_values"].dim() == 4:
        return {(0, i): s for i, s in enumerate(slots)}
    vc = model.config.vision_config
    side = vc.image_size // vc.patch_size
    h, w = kw["image_sizes"][0].tolist()
    gh, gw = h // vc.image_size, w // vc.image_size  # square-pinpoint images: nothing unpadded
    out = {(0, i): slots[i] for i in range(side * side)}
    k = side * side
    for r in range(gh * side):
        for c in range(gw * side):
            out[(1 + (r // side) * gw + c // side, (r % side) * side + c % side)] = slots[k]
            k += 1
        k += 1  # the row's newline token
    return out


# HiRED (official: hasanar1f/HiRED): CLS attention (softmax over all keys, summed over heads);
# LLaVA-1.5 keeps the top int(N * budget) at the feature layer. LLaVA-NeXT: total int(P * N * budget),
# the base image min(int(total * alpha), N) by its own score, the rest split over crops by how many of
# the base's top N * (1 - alpha) layer-0 tokens fall in each crop's region. Decisions followed here:
# crop regions are the 2-D blocks of the base grid (the official code cuts horizontal bands), the
# split hands the remainder out by largest remainder (official: floor), newlines stay.


def _cls_attention(out, layer: int) -> torch.Tensor:
    return out.attentions[layer][:, :, 0, 1:].sum(1)  # [crops, patches]


def _largest_remainder(total: int, weights: list[int]) -> list[int]:
    exact = [total * w / sum(weights) for w in weights]
    floor = [int(e) for e in exact]
    order = sorted(range(len(weights)), key=lambda j: floor[j] - exact[j])  # stable: first on ties
    for j in order[: total - sum(floor)]:
        floor[j] += 1
    return floor


def _hired_reference(model, kw, budget: float, alpha: float) -> set[int]:
    out = _tower(model, _crops(kw))
    select = _cls_attention(out, -2)  # the feature layer (hidden_states[-2] is its output)
    slot = _slot_of(model, kw)
    n = select.shape[1]
    if select.shape[0] == 1:
        return {slot[(0, i)] for i in _top(select[0], int(n * budget))}
    total = int(select.shape[0] * n * budget)
    base_k = min(int(total * alpha), n)
    kept = {slot[(0, i)] for i in _top(select[0], base_k)}
    side = int(n**0.5)
    h, w = kw["image_sizes"][0].tolist()
    vc = model.config.vision_config
    gh, gw = h // vc.image_size, w // vc.image_size
    hot = torch.tensor(sorted(_top(_cls_attention(out, 0)[0], int(n * (1 - alpha)))))
    region = (hot // side * gh // side) * gw + (hot % side) * gw // side
    shares = torch.bincount(region, minlength=gh * gw).tolist()
    for j, k in enumerate(_largest_remainder(total - base_k, shares)):
        kept |= {slot[(1 + j, i)] for i in _top(select[1 + j], k)}
    return kept


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_hired_keeps_the_official_set(family):
    model = tiny.BUILDERS[family](attn="eager")
    kw = tiny.inputs(family, model, [1], seed=42, sizes=[(64, 64)] if family == "llava_next" else None)
    expected = _hired_reference(model, kw, budget=0.2, alpha=0.5)
    visual = _image_slots(kw)
    newlines = set(visual.tolist()) - set(_slot_of(model, kw).values())
    with torch.no_grad(), vtprune.pruned(model, "hired", budget=0.2):
        model(**kw)
        kept = set(vtprune.stats(model).selections["hired"][0].tolist())
    assert kept == expected | newlines


# --------------------------------------------------------------------------------------------
# VisionZip (official: dvlab-research/VisionZip), per crop: CLS plus the top dominant - 1 patches by
# CLS attention (summed over heads) at the feature layer; of the other n patches, targets every
# n // contextual-th (first contextual of them); the rest join the target of most similar layer key
# (k_proj output, mean over heads, cosine); each contextual token is target + mean(other members) on
# the feature layer's hidden states; every token goes through the projector. Decisions followed
# here: tokens keep their positions, merged ones at their target's, CLS at the first position of its
# crop that is neither dominant nor a target; newlines stay.


def _visionzip_reference(model, kw, dominant: int, contextual: int) -> dict[int, torch.Tensor]:
    """Sequence position -> the language model's input there, for every kept patch position."""
    tower = model.model.vision_tower
    crops = _crops(kw)
    out = _tower(model, crops)
    hidden = out.hidden_states[-2]  # [crops, 1 + patches, D]
    layer = getattr(tower, "vision_model", tower).encoder.layers[-2]
    with torch.no_grad():
        keys = layer.self_attn.k_proj(layer.layer_norm1(out.hidden_states[-3]))
    keys = keys.view(*keys.shape[:2], layer.self_attn.num_heads, -1).mean(2)
    cls_attn = _cls_attention(out, -2)
    slot = _slot_of(model, kw)
    rows: dict[int, torch.Tensor] = {}
    for c in range(crops.shape[0]):
        patches = torch.arange(cls_attn.shape[1])
        dom = cls_attn[c].topk(dominant - 1).indices
        rest = patches[~torch.isin(patches, dom)]
        step = max(1, rest.numel() // contextual)
        targets = torch.arange(0, rest.numel(), step)[:contextual]
        others = rest[~torch.isin(torch.arange(rest.numel()), targets)]
        metric = torch.nn.functional.normalize(keys[c, 1:], dim=-1)
        assign = (metric[others] @ metric[rest[targets]].T).argmax(1)
        for i in dom.tolist():
            rows[slot[(c, i)]] = hidden[c, 1 + i]
        for j, t in enumerate(rest[targets].tolist()):
            group = others[assign == j]
            merged = hidden[c, 1 + group].mean(0) if group.numel() else torch.zeros_like(hidden[c, 0])
            rows[slot[(c, t)]] = hidden[c, 1 + t] + merged
        cls_at = min(s for (cc, i), s in slot.items() if cc == c and s not in rows)
        rows[cls_at] = hidden[c, 0]
    with torch.no_grad():
        projected = model.model.multi_modal_projector(torch.stack(list(rows.values())))
    return dict(zip(rows, projected))


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_visionzip_keeps_the_official_set_and_merged_embeddings(family):
    model = tiny.BUILDERS[family](attn="eager")
    kw = tiny.inputs(family, model, [1], seed=43, sizes=[(64, 64)] if family == "llava_next" else None)
    dominant, contextual = 10, 4  # per crop, of 64 patches
    expected = _visionzip_reference(model, kw, dominant, contextual)
    seen, stats = _lm_inputs(model, kw, "visionzip", dominant=dominant, contextual=contextual)
    kept = stats.selections["visionzip"][0]
    newlines = set(_image_slots(kw).tolist()) - set(_slot_of(model, kw).values())
    assert set(kept.tolist()) == set(expected) | newlines
    # the compacted input holds the kept tokens in position order: text, then the image's rows
    visual_rows = seen["embeds"][0, _image_slots(kw)[0] :][: kept.numel()]
    for p, row in zip(kept.tolist(), visual_rows):
        if p in expected:
            torch.testing.assert_close(row, expected[p], rtol=1e-5, atol=1e-5)


def test_visionzip_mean_merge_option_averages_the_group_after_the_projector():
    model = tiny.llava(attn="eager")
    kw = tiny.inputs("llava", model, [1], seed=43)
    official = _visionzip_reference(model, kw, 10, 4)
    unpruned, _ = _lm_inputs(model, kw)
    seen, stats = _lm_inputs(model, kw, "visionzip", dominant=10, contextual=4, merge="mean")
    kept = stats.selections["visionzip"][0]
    assert set(kept.tolist()) == set(official)  # the same selection; only the merge differs
    visual_rows = seen["embeds"][0, _image_slots(kw)[0] :][: kept.numel()]
    lm_in = unpruned["embeds"][0]
    changed = [p for p, row in zip(kept.tolist(), visual_rows) if not torch.equal(row, lm_in[p])]
    assert len(changed) == 1 + 4  # the CLS slot and the 4 contextual tokens
