"""Zero-TPrune on LLaVA-NeXT: each crop a row of the tower batch with its share of the image's
budget; the plain per-crop reference (eager map, looped PageRank and similarity), the shared
tables, keep within 2%."""

from __future__ import annotations

import math

import pytest
import tiny
import torch
from helpers import eager_clip_layer, image_runs, shared_tables
from test_zerotprune import loop_crop_step, loop_pagerank

import vtprune
from vtprune.integrations.llava_next import LlavaNextAdapter

TOWER = 8  # feature layer 6: the default prunes after tower layer 5
SIZES = [(40, 64), (64, 64), (64, 40)]  # 1 x 2 crops, unpadded to 12 of 16 columns; 2 x 2; 2 x 1, unpadded


@pytest.fixture(scope="module")
def next_model():
    return tiny.llava_next(tower_layers=TOWER)


def crop_targets(model, spec, keep: float) -> list[int]:
    """The patches each crop keeps: ``round(keep * N)`` of the image (``N`` its language-model
    tokens, newlines included), split over the crops by the patches each shows after unpadding."""
    per_crop = LlavaNextAdapter(model).tower_tokens_per_crop
    shown = torch.bincount(spec.source[spec.source >= 0] // per_crop, minlength=spec.crops)
    total = int(shown.sum())
    budget = min(total, max(1, math.floor(keep * spec.num_tokens + 0.5)))
    ends = [math.floor(budget * int(c) / total + 0.5) for c in shown.cumsum(0)]
    return [b - a for a, b in zip([0] + ends[:-1], ends)]


def crop_reference(model, pixels, target: int, shown: torch.Tensor, layers: list[int]) -> list[int]:
    """The rule on one crop, the tower run plainly with its full eager attention matrices: the map
    and PageRank over every present token, the picks among the ``shown`` patches only; patches
    unpadding cuts stay while the crop drops none of its shown ones, else they leave."""
    tower = model.model.vision_tower
    vm = getattr(tower, "vision_model", tower)
    h = vm.pre_layrnorm(vm.embeddings(pixels))
    kept = list(range(h.shape[1] - 1))  # patch ids, CLS excluded
    n0 = int(shown.sum())
    for idx, layer in enumerate(vm.encoder.layers):
        h, q, k, v, weights = eager_clip_layer(layer, h)  # weights: [1, H, T, T]
        if idx not in layers:
            continue
        scores = loop_pagerank(weights[0].mean(0), 30)[1:]
        keys = k[0].mean(0)[1:].tolist()
        chosen = loop_crop_step(scores, keys, kept, shown, n0, target, layers.index(idx) + 1, len(layers))
        h = torch.cat([h[:, :1], h[:, 1:][:, chosen]], dim=1)
        kept = [kept[i] for i in chosen]
    return kept


@pytest.mark.parametrize("keep,layers", [(0.3, None), (0.11, [2, 5]), (1.0, [1])])
def test_kept_sets_equal_the_plain_reference(next_model, keep, layers):
    """Each image's kept placeholders: every crop's picks (the plain rule) at the cells unpadding
    puts them, newlines gone once the image drops anything."""
    model = next_model
    kw = tiny.inputs("llava_next", model, [3], seed=7, sizes=SIZES)
    adapter = LlavaNextAdapter(model)
    per_crop = adapter.tower_tokens_per_crop
    with torch.no_grad(), vtprune.pruned(model, "zerotprune", keep=keep, layers=layers):
        model(**kw)
        selection = vtprune.stats(model).selections["zerotprune"][0]
    with torch.no_grad():
        for i, size in enumerate(SIZES):
            spec = adapter._spec(list(size))
            expect = torch.zeros(spec.num_tokens, dtype=torch.bool)
            for c, target in enumerate(crop_targets(model, spec, keep)):
                mine = (spec.source >= 0) & (spec.source // per_crop == c)
                shown = torch.zeros(per_crop - 1, dtype=torch.bool)
                shown[spec.source[mine] % per_crop - 1] = True
                kept = crop_reference(model, kw["pixel_values"][i, c : c + 1], target, shown, layers or [5])
                cells = {p + 1 + c * per_crop for p in kept}
                for t in torch.nonzero(mine).flatten().tolist():
                    expect[t] = int(spec.source[t]) in cells
            if keep == 1.0:
                expect[spec.source < 0] = True  # nothing dropped: the newlines stay
            else:
                assert int(expect.sum()) == sum(crop_targets(model, spec, keep))
            _, pos = image_runs(kw["input_ids"])[i]
            assert torch.equal(torch.isin(pos, selection), expect), i


def test_tower_tokens_per_layer(next_model):
    kw = tiny.inputs("llava_next", next_model, [1], seed=3, sizes=[(64, 64)])  # base + 2 x 2 crops
    spec = LlavaNextAdapter(next_model)._spec([64, 64])
    with torch.no_grad(), vtprune.pruned(next_model, "zerotprune", keep=0.2, layers=[1, 4]):
        next_model(**kw)
        st = vtprune.stats(next_model)
    targets = crop_targets(next_model, spec, 0.2)
    tower = st.tower_tokens_per_layer
    assert tower[:2] == [5 * 65] * 2 and tower[2] == tower[4] > tower[5] == tower[7]
    assert tower[5] == sum(targets) + 5  # every crop's share + its CLS
    assert st.visual_tokens_per_layer[0] == sum(targets)  # the grid's newlines left with the drops


@pytest.mark.parametrize("keep", [0.5, 0.25, 0.11])
@pytest.mark.parametrize("sizes", [[(64, 64)], [(40, 64), (64, 40)]])
def test_keep_target_within_two_percent(next_model, keep, sizes):
    kw = tiny.inputs("llava_next", next_model, [len(sizes)], seed=1, sizes=sizes)
    with torch.no_grad(), vtprune.pruned(next_model, "zerotprune", keep=keep, layers=[1, 4]):
        next_model(**kw)
        got = vtprune.stats(next_model).keep_ratio
    assert abs(got - keep) / keep <= 0.02, got


# -- the shared equivalence tables ---------------------------------------------------------------
(
    test_nothing_to_drop_equals_unpruned,
    test_remove_restores_the_model,
    test_cached_generate_equals_uncached,
    test_padded_batch_equals_rows_alone,
) = shared_tables("zerotprune", {"llava_next": "next_model"}, plan=dict(keep=0.3, layers=[1, 3]))


def test_full_strategy_is_refused():
    model = tiny.llava_next()
    model.config.vision_feature_select_strategy = "full"
    with pytest.raises(NotImplementedError, match="vision_feature_select_strategy='default', not 'full'"):
        vtprune.apply(model, "zerotprune")
    assert vtprune.api.handle_of(model) is None
