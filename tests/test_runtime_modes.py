"""Generation modes, dtypes, attention backends, training scores, placement and concurrency."""

from __future__ import annotations

import threading

import pytest
import tiny
import torch
from helpers import BANNED, greedy, row_alone, uncached_greedy

import vtprune
from vtprune import compat
from vtprune.scoring import layer_query_probs


@pytest.fixture(scope="module")
def llava():
    return tiny.llava()


def test_beam_search_batch_equals_rows_alone(llava):
    images = [1, 1]
    kw = tiny.inputs("llava", llava, images, seed=11)
    with vtprune.pruned(llava, "pdrop", keep=0.4):
        batch = greedy(llava, kw, 4, num_beams=3)
        rows = [greedy(llava, row_alone("llava", kw, b, images), 4, num_beams=3) for b in range(2)]
        assert vtprune.stats(llava).kv_cache_lengths[-1] < vtprune.stats(llava).kv_cache_lengths[0]
    assert torch.equal(batch, torch.cat(rows))


def test_beam_search_keep_all_equals_unpruned(llava):
    kw = tiny.inputs("llava", llava, [1, 1], seed=12)
    ref = greedy(llava, kw, 4, num_beams=2)
    with vtprune.pruned(llava, "fastv", keep=1.0):
        assert torch.equal(greedy(llava, kw, 4, num_beams=2), ref)


def test_sampling_runs_and_keeps_the_pruned_cache(llava):
    kw = tiny.inputs("llava", llava, [1, 0], seed=13)
    with vtprune.pruned(llava, "fastv", keep=0.5):
        torch.manual_seed(0)
        out = llava.generate(**kw, max_new_tokens=5, do_sample=True, top_k=5, suppress_tokens=BANNED)
        torch.manual_seed(0)
        again = llava.generate(**kw, max_new_tokens=5, do_sample=True, top_k=5, suppress_tokens=BANNED)
    assert out.shape == (2, kw["input_ids"].shape[1] + 5) and torch.equal(out, again)


def test_manual_decode_loop_without_position_ids(llava):
    """Callers that pass no positions get the original ones (not the pruned cache length)."""
    kw = tiny.inputs("llava", llava, [1], seed=14)
    with torch.no_grad(), vtprune.pruned(llava, "uniform", keep=0.25):
        ref = greedy(llava, kw, 4)
        out = llava(**kw)
        cache, mask, toks = compat.output_cache(out), kw["attention_mask"], []
        logits = out.logits[:, -1]
        for _ in range(4):
            logits[:, BANNED] = float("-inf")
            nxt = logits.argmax(-1, keepdim=True)
            toks.append(nxt)
            mask = torch.cat([mask, torch.ones_like(nxt)], 1)
            step = llava(input_ids=nxt, attention_mask=mask, **compat.cache_kwargs(cache))
            logits = step.logits[:, -1]
    assert torch.equal(torch.cat(toks, 1), ref)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_eager_attention_cached_equals_uncached(family):
    model = tiny.BUILDERS[family](attn="eager")
    kw = tiny.inputs(family, model, [1], seed=15)
    with vtprune.pruned(model, "pdrop", keep=0.4):
        cached = greedy(model, kw, 5)
        sel = vtprune.stats(model).selections
        assert torch.equal(cached, uncached_greedy(model, kw, sel, 5))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl"])
def test_half_precision(family, dtype):
    model = tiny.BUILDERS[family](dtype=dtype)
    kw = tiny.inputs(family, model, [1, 1], seed=16)
    kw["pixel_values"] = kw["pixel_values"].to(dtype)
    with torch.no_grad():
        ref = model(**kw).logits
        with vtprune.pruned(model, "fastv", keep=1.0):
            assert torch.equal(model(**kw).logits, ref)
        with vtprune.pruned(model, "pdrop", keep=0.3):
            out = model(**kw).logits
            assert vtprune.stats(model).keep_ratio < 0.4
    assert torch.isfinite(out).all()


def test_pdrop_training_scores_use_tokens_before_answers(llava):
    kw = tiny.inputs("llava", llava, [1], seed=17)
    labels = torch.full_like(kw["input_ids"], -100)
    n = kw["input_ids"].shape[1]
    labels[0, n - 3 :] = kw["input_ids"][0, n - 3 :]  # one answer span: the last 3 tokens
    seen = {}

    def grab(module, args, kwargs):
        seen.setdefault("h", args[0] if args else kwargs["hidden_states"])
        seen.setdefault("cos", kwargs["position_embeddings"])

    layers = llava.model.language_model.layers
    with vtprune.pruned(llava, "pdrop", layers=[3], ratio=0.25):
        hook = layers[3].register_forward_pre_hook(grab, with_kwargs=True, prepend=True)
        out = llava(**kw, labels=labels)
        hook.remove()
        kept = vtprune.stats(llava).selections["pdrop@3"][0]
    assert torch.isfinite(out.loss) and out.logits.shape[1] == n
    valid = torch.ones(1, n, dtype=torch.bool)
    probs = layer_query_probs(layers[3], seen["h"], *seen["cos"], valid, torch.tensor([[n - 4]]))[0, 0]
    visual = kw["input_ids"][0] == tiny.IMAGE
    expected = torch.nonzero(visual).flatten()[probs[visual].topk(16).indices].sort().values
    assert torch.equal(kept, expected)


def test_compose_vision_then_prefill_stage(llava):
    kw = tiny.inputs("llava", llava, [1], seed=18)
    plan = vtprune.Compose(vtprune.UniformPrune(keep=0.5), vtprune.PyramidDrop(layers=[4], ratio=0.5))
    with torch.no_grad(), vtprune.pruned(llava, plan):
        llava(**kw)
        st = vtprune.stats(llava)
    assert st.visual_tokens_per_layer == [32] * 4 + [16] * 4
    assert set(st.selections) == {"uniform", "pdrop@4"}


def test_apply_replaces_and_pruned_restores_previous(llava):
    kw = tiny.inputs("llava", llava, [1], seed=19)
    vtprune.apply(llava, "uniform", keep=0.5)
    vtprune.apply(llava, "uniform", keep=0.25)
    with torch.no_grad():
        llava(**kw)
        assert vtprune.stats(llava).visual_tokens_per_layer[0] == 16
        with vtprune.pruned(llava, "random", keep=0.5):
            llava(**kw)
            assert vtprune.stats(llava).visual_tokens_per_layer[0] == 32
        llava(**kw)
        assert vtprune.stats(llava).visual_tokens_per_layer[0] == 16
    vtprune.remove(llava)
    assert vtprune.api.handle_of(llava) is None


def test_two_models_and_two_threads_do_not_share_state():
    a, b = tiny.llava(seed=1), tiny.qwen2_vl(seed=2)
    kwa, kwb = tiny.inputs("llava", a, [1, 1], seed=20), tiny.inputs("qwen2_vl", b, [1], seed=21)
    vtprune.apply(a, "fastv", keep=0.5)
    vtprune.apply(b, "pdrop", keep=0.4)
    ref_a, ref_b = greedy(a, kwa, 6), greedy(b, kwb, 6)
    results = {}

    def run(name, model, kw):
        results[name] = [greedy(model, kw, 6) for _ in range(3)]

    threads = [threading.Thread(target=run, args=x) for x in (("a", a, kwa), ("b", b, kwb))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(r, ref_a) for r in results["a"])
    assert all(torch.equal(r, ref_b) for r in results["b"])
    vtprune.remove(a)
    vtprune.remove(b)


def test_accelerate_cpu_and_disk_offload(tmp_path):
    from accelerate import dispatch_model

    model = tiny.llava(seed=3)
    kw = tiny.inputs("llava", model, [1, 1], seed=22)
    with vtprune.pruned(model, "pdrop", keep=0.4):
        ref = greedy(model, kw, 5)
    device_map = {"model.vision_tower": "cpu", "model.multi_modal_projector": "cpu", "lm_head": "cpu"}
    device_map["model.language_model.embed_tokens"] = "cpu"
    device_map["model.language_model.norm"] = "cpu"
    device_map["model.language_model.rotary_emb"] = "cpu"
    for i in range(tiny.LAYERS):
        device_map[f"model.language_model.layers.{i}"] = "disk" if i % 2 else "cpu"
    dispatched = dispatch_model(model, device_map=device_map, offload_dir=str(tmp_path))
    with vtprune.pruned(dispatched, "pdrop", keep=0.4):
        out = greedy(dispatched, kw, 5)
        assert vtprune.stats(dispatched).keep_ratio < 0.5
    assert torch.equal(out, ref)


def test_from_pretrained_local_folder_keeps_sdpa(tmp_path, llava):
    from transformers import LlavaForConditionalGeneration

    llava.save_pretrained(tmp_path)
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    kw = tiny.inputs("llava", model, [1], seed=23)
    seen = []

    def spy(module, args, kwargs):
        seen.append(module.config._attn_implementation)

    hook = model.model.language_model.layers[-1].self_attn.register_forward_pre_hook(spy, with_kwargs=True)
    with vtprune.pruned(model, "fastv", keep=0.5):
        greedy(model, kw, 2)
    hook.remove()
    # scores are computed beside SDPA: the model never switches to eager attention
    assert seen and set(seen) == {"sdpa"}
