"""PrefixKV: per-layer KV budgets from one global cumulative-importance level (decode stage).

What equivalence holds for a decode-time KV method: the prefill is unpruned, so the first
generated token's logits equal the unpruned model's exactly; every later token equals the
unpruned model decoding over a KV cache from which exactly the evicted positions were removed
by hand (per layer), with the original positions continuing. An uncached recomputation is not
a reference (it would attend to every position again).
"""

from __future__ import annotations

import numpy as np
import pytest
import tiny
import torch
from helpers import BANNED, count_hooks, greedy, row_alone
from transformers import DynamicCache

import vtprune
from vtprune.compat import cache_kwargs
from vtprune.kv_budget import forget_counts

FAMILIES = ["llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_onevision"]
SINK = 4


# -- a plain reference of the official rule ---------------------------------------------------------
def official_forget(scores: list[np.ndarray], keep: float, protect: int) -> list[int]:
    """The official profiler's search written plainly: sorted cumulative shares per layer, one level
    bisected until the evictions are within 5 of the target, then rescaled and floored."""
    cdfs = [np.cumsum(np.sort(s)[::-1] / s.sum()) for s in scores]
    sizes = np.array([len(s) for s in scores])
    target = (1 - keep) * sizes.sum()

    def count(p):
        held = np.array([np.searchsorted(c, p, side="left") + 1 for c in cdfs])
        return np.maximum(sizes - held - protect, 0)

    left, right, mid = 0.0, 1.0, 0.0
    for _ in range(64):
        mid = (left + right) / 2
        c = count(mid).sum()
        if abs(c - target) < 5:
            break
        if c < target:
            right = mid
        else:
            left = mid
    f = count(mid).astype(np.float64)
    if f.sum():
        f = f * target / f.sum()
    return [int(x) for x in np.minimum(np.floor(f), sizes - protect)]


def official_kept(score: np.ndarray, forget: int) -> list[int]:
    """First SINK and the last position kept; the ``forget`` lowest scores in between go."""
    n = len(score)
    middle = np.arange(SINK, n - 1)
    order = middle[np.argsort(score[middle], kind="stable")]
    return sorted(set(range(SINK)) | set(order[forget:].tolist()) | {n - 1})


def eager_scores(model, kw) -> list[np.ndarray]:
    """Column sums of head-averaged eager attention, one array per layer (batch of one row)."""
    with torch.no_grad():
        out = model(**kw, output_attentions=True)
    return [a[0].double().mean(0).sum(0).numpy() for a in out.attentions]


def test_forget_counts_match_the_plain_official_search():
    gen = torch.Generator().manual_seed(0)
    scores = [torch.rand(n, generator=gen) ** (3 * i + 1) for i, n in enumerate([50, 50, 40, 60])]
    for keep in (0.2, 0.3, 0.5, 0.9):
        assert forget_counts(scores, keep, 5) == official_forget(
            [s.double().numpy() for s in scores], keep, 5
        )


@pytest.mark.parametrize("use_profile", [False, True])
def test_kept_set_per_layer_matches_eager_reference(use_profile, tmp_path):
    model = tiny.llava(attn="eager")
    kw = tiny.inputs("llava", model, [1], seed=11)
    scores = eager_scores(model, kw)
    n = kw["input_ids"].shape[1]
    keep = 0.3
    options = {}
    if use_profile:
        calib = [tiny.inputs("llava", model, [1], seed=s) for s in (12, 13)]
        prof = vtprune.profile_prefixkv(model, calib, budgets=[0.3])
        # the profile is the mean over calibration prompts of each prompt's own official budgets
        expect = np.mean(
            [
                [1 - f / n_ for f, n_ in zip(official_forget(s, keep, SINK + 1), [len(x) for x in s])]
                for s in (eager_scores(model, c) for c in calib)
            ],
            axis=0,
        )
        np.testing.assert_allclose(prof.retentions[0], expect, atol=1e-9)
        prof.save(tmp_path / "p.json")
        options["profile"] = str(tmp_path / "p.json")
        forget = [round((1 - r) * n) for r in prof.retentions[0]]
    else:
        forget = official_forget(scores, keep, SINK + 1)
    with torch.no_grad(), vtprune.pruned(model, "prefixkv", keep=keep, **options):
        model(**kw, use_cache=True)
        st = vtprune.stats(model)
    for layer, s in enumerate(scores):
        assert st.kv_positions[layer][0].tolist() == official_kept(s, forget[layer]), layer
    assert st.kv_cache_lengths == [n - f for f in forget]


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request):
    return request.param, tiny.BUILDERS[request.param]()


def test_keep_everything_equals_unpruned_generate(family_model):
    family, model = family_model
    kw = tiny.inputs(family, model, [1, 2, 0], side="left", seed=21)
    ref = greedy(model, kw, 4)
    with vtprune.pruned(model, "prefixkv", keep=1.0):
        assert torch.equal(greedy(model, kw, 4), ref)
        assert vtprune.stats(model).kv_cache_lengths == [kw["input_ids"].shape[1]] * tiny.LAYERS


def test_remove_restores_exact_generate_and_hooks(family_model):
    family, model = family_model
    kw = tiny.inputs(family, model, [1], seed=22)
    hooks, attn = count_hooks(model), model.config.get_text_config()._attn_implementation
    ref = greedy(model, kw, 6)
    handle = vtprune.apply(model, "prefixkv", keep=0.2)
    assert model.config.get_text_config()._attn_implementation != attn  # the scoring tap
    pruned = greedy(model, kw, 6)
    assert max(vtprune.stats(model).kv_cache_lengths) < kw["input_ids"].shape[1]
    handle.remove()
    assert torch.equal(greedy(model, kw, 6), ref)
    assert count_hooks(model) == hooks and model.config.get_text_config()._attn_implementation == attn
    assert pruned.shape == ref.shape


def _decode_over_edited_cache(model, kw, positions: list[torch.Tensor], steps: int, family: str):
    """The unpruned model: prefill, remove exactly the evicted positions from each layer's cache by
    hand, then decode greedily at the original positions (no mask: every kept entry is visible)."""
    cache = DynamicCache(config=model.config.get_text_config())
    n = kw["input_ids"].shape[1]
    with torch.no_grad():
        out = model(**kw, **cache_kwargs(cache), use_cache=True)
        for layer, pos in zip(cache.layers, positions):
            layer.keys, layer.values = layer.keys[:, :, pos], layer.values[:, :, pos]
        logits, tokens, first = out.logits[:, -1], [], out.logits[:, -1].clone()
        rope_deltas = getattr(model.model, "rope_deltas", None)
        for t in range(steps):
            logits[:, BANNED] = float("-inf")
            nxt = logits.argmax(-1, keepdim=True)
            tokens.append(nxt)
            pos_ids = torch.tensor([[n + t]])
            if rope_deltas is not None:  # Qwen: the text position continues after the M-RoPE offset
                pos_ids = (pos_ids + rope_deltas).unsqueeze(0).expand(3, -1, -1)
            out = model(
                input_ids=nxt, **cache_kwargs(cache), use_cache=True, position_ids=pos_ids,
                cache_position=torch.tensor([n + t]),
            )  # fmt: skip
            logits = out.logits[:, -1]
    return first, torch.cat(tokens, 1)


@pytest.mark.parametrize("source", ["request", "profile"])
def test_cached_generate_equals_unpruned_decode_over_the_kept_kv(family_model, source):
    family, model = family_model
    kw = tiny.inputs(family, model, [1], seed=23)
    options = {}
    if source == "profile":
        options["profile"] = vtprune.profile_prefixkv(model, [tiny.inputs(family, model, [1], seed=24)])
    with torch.no_grad():
        ref_first = model(**kw).logits[:, -1]
    with vtprune.pruned(model, "prefixkv", keep=0.3, **options):
        with torch.no_grad():
            assert torch.equal(model(**kw).logits[:, -1], ref_first)  # the prefill is unpruned
        cached = greedy(model, kw, 6)
        st = vtprune.stats(model)
    first, reference = _decode_over_edited_cache(model, kw, [p[0] for p in st.kv_positions], 6, family)
    assert torch.equal(first, ref_first)
    assert torch.equal(cached, reference)
    # all tokens (not only visual) compete; every layer keeps its budget, the sink and the last token
    n = kw["input_ids"].shape[1]
    for pos in st.kv_positions:
        assert pos[0][:SINK].tolist() == list(range(SINK)) and int(pos[0][-1]) == n - 1
    # evictions are floored per layer after the rescale: under one position per layer above the budget
    assert 0.3 <= sum(st.kv_cache_lengths) / (len(st.kv_cache_lengths) * n) < 0.3 + 1 / n


def test_left_padded_batch_equals_rows_alone(family_model):
    family, model = family_model
    images = [1, 2, 0]
    sizes = {
        "llava_next": [(32, 64), (64, 64), (64, 32)],
        "qwen2_vl": [(16, 16), (8, 12), (12, 16)],
        "qwen2_5_vl": [(8, 12), (8, 8), (12, 8)],
        "llava_onevision": [(20, 40), (40, 40), (30, 50)],
        "qwen3_vl": [(8, 12), (8, 8), (12, 8)],
    }.get(family)
    kw = tiny.inputs(family, model, images, side="left", seed=25, sizes=sizes)
    with vtprune.pruned(model, "prefixkv", keep=0.3):
        batch = greedy(model, kw, 5, min_new_tokens=5)  # no row stops early (eos pads the batch)
        batch_pos = vtprune.stats(model).kv_positions
        for b in range(len(images)):
            alone = row_alone(family, kw, b, images)
            assert torch.equal(greedy(model, alone, 5, min_new_tokens=5), batch[b : b + 1]), b
            pad = int((~kw["attention_mask"][b].bool()).sum())
            got = [layer[0] + pad for layer in vtprune.stats(model).kv_positions]
            assert all(torch.equal(g, layer[b]) for g, layer in zip(got, batch_pos)), b


def test_profile_budgets_set_the_cache_lengths_and_round_trip(tmp_path):
    model = tiny.llava()
    calib = [tiny.inputs("llava", model, [1], seed=s) for s in (31, 32, 33)]
    prof = vtprune.profile_prefixkv(model, calib, budgets=[0.2, 0.4], name="tiny-llava")
    assert prof.samples == 3 and len(prof.retentions) == 2 and len(prof.retentions[0]) == tiny.LAYERS
    for budget, ret in zip(prof.budgets, prof.retentions):
        assert abs(sum(ret) / len(ret) - budget) < 0.03  # floored evictions: slightly above
    prof.save(tmp_path / "prof.json")
    again = vtprune.PrefixKVProfile.load(tmp_path / "prof.json")
    assert again == prof
    kw = tiny.inputs("llava", model, [1], seed=34)
    n = kw["input_ids"].shape[1]
    for keep in (0.2, 0.3, 0.4):
        with torch.no_grad(), vtprune.pruned(model, "prefixkv", keep=keep, profile=tmp_path / "prof.json"):
            model(**kw, use_cache=True)
            lengths = vtprune.stats(model).kv_cache_lengths
        assert lengths == [n - round((1 - r) * n) for r in again.retention(keep, tiny.LAYERS)]
    with pytest.raises(ValueError, match=r"prefixkv: option 'keep'=0.1 is outside the profiled budgets"):
        vtprune.apply(model, "prefixkv", keep=0.1, profile=again)
    with pytest.raises(ValueError, match="prefixkv: cannot read a profile"):
        vtprune.apply(model, "prefixkv", keep=0.3, profile=tmp_path / "missing.json")
    assert vtprune.api.handle_of(model) is None


def test_profile_refuses_a_pruned_model_and_bad_budgets():
    model = tiny.llava()
    kw = tiny.inputs("llava", model, [1], seed=35)
    with pytest.raises(ValueError, match=r"budget 1.5 is invalid; allowed: numbers in \(0, 1\)"):
        vtprune.profile_prefixkv(model, [kw], budgets=[1.5])
    with vtprune.pruned(model, "fastv", keep=0.5):
        with pytest.raises(ValueError, match="needs the unpruned model"):
            vtprune.profile_prefixkv(model, [kw])


def test_composes_with_a_prefill_method():
    model = tiny.llava()
    kw = tiny.inputs("llava", model, [1], seed=36)
    with vtprune.pruned(model, vtprune.Compose(vtprune.FastV(keep=0.5), vtprune.PrefixKV(keep=0.5))):
        greedy(model, kw, 3)
        st = vtprune.stats(model)
    with vtprune.pruned(model, "fastv", keep=0.5):
        greedy(model, kw, 3)
        alone = vtprune.stats(model)
    # each layer keeps about half of what FastV left it
    for mine, theirs in zip(st.kv_cache_lengths, alone.kv_cache_lengths):
        assert mine < theirs
    assert abs(sum(st.kv_cache_lengths) / sum(alone.kv_cache_lengths) - 0.5) < 0.05
