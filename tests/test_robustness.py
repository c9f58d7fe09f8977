"""What a hostile but realistic user does: prompts ending in an image, failed applies, copies,
threads, nested plans, stale handles (issue 14)."""

from __future__ import annotations

import copy
import threading

import pytest
import tiny
import torch
from helpers import count_hooks, greedy, uncached_greedy

import vtprune
from vtprune import compat

METHODS = vtprune.method_names()  # every registered method, at keep=0.25
# prefixkv prunes the KV cache after an unpruned prefill (keep_ratio stays 1): its sink and
# last-token protection is checked per layer in test_prefixkv.py
PREFILL_METHODS = [m for m in METHODS if m != "prefixkv"]


def _llava():
    """A tiny LLaVA after one forward (transformers installs its output-capturing hooks lazily)."""
    model = tiny.llava()
    with torch.no_grad():
        model(**tiny.inputs("llava", model, [1], seed=0))
    return model


def _ending_with_image(family, model):
    """Left-padded rows whose prompt ends with the image's last placeholder (and a text-only row)."""
    kw = tiny.inputs(family, model, [1, 1, 0], side="left", seed=7, post=[0, 0, 0])
    for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
        if key in kw:
            kw[key] = kw[key][:, :-2]  # drop the two text tokens that follow every image
    assert (kw["input_ids"][:2, -1] == tiny.IMAGE).all()
    return kw


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("method", PREFILL_METHODS)
def test_a_prompt_ending_with_an_image_keeps_its_last_token(family, method):
    model = tiny.BUILDERS[family]()
    kw = _ending_with_image(family, model)
    last = kw["input_ids"].shape[1] - 1
    with torch.no_grad(), vtprune.pruned(model, method, keep=0.25):
        logits = model(**kw).logits
        st = vtprune.stats(model)
    assert st.keep_ratio < 0.6, "the plan pruned nothing: the test would prove nothing"
    # the next-token logits come from the last position: never the zeros of a pruned slot
    assert (logits[:, -1].abs().sum(-1) > 0).all()
    for key, rows in st.selections.items():
        for b in (0, 1):
            assert last in rows[b].tolist(), f"{key} dropped row {b}'s last token"


@pytest.mark.parametrize("method", ["fastv", "uniform"])
def test_cached_generate_after_a_trailing_image_equals_the_uncached_pruned_steps(method):
    model = tiny.llava()
    kw = _ending_with_image("llava", model)
    one = {k: v[:1] for k, v in kw.items() if k != "pixel_values"}
    one["pixel_values"] = kw["pixel_values"][:1]
    one = {k: v[:, one["attention_mask"][0].bool()] if v.dim() == 2 else v for k, v in one.items()}
    with vtprune.pruned(model, method, keep=0.25):
        cached = greedy(model, one, 4)
        reference = uncached_greedy(model, one, vtprune.stats(model).selections, 4)
    assert torch.equal(cached, reference)


# -- apply is all-or-nothing ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "method, opts, match",
    [
        (
            "hired",
            {"split_layer": 99},
            r"hired: option 'split_layer'=99 is out of range; allowed: an integer in -3..2",
        ),
        ("hired", {"select_layer": -9}, r"'select_layer'=-9 is out of range"),
        ("visionzip", {"layer": 3}, r"visionzip: option 'layer'=3 is out of range"),
        ("mustdrop", {"layers": [2, 7]}, r"mustdrop: option 'layers' holds 7; allowed: integers in 0..6"),
    ],
)
def test_model_dependent_options_are_named_and_the_previous_plan_survives(method, opts, match):
    model = _llava()
    kw = tiny.inputs("llava", model, [1], seed=2)
    base = count_hooks(model)  # transformers' own output-capturing hooks
    with torch.no_grad():
        first = vtprune.apply(model, "pdrop", keep=0.5)
        before = model(**kw).logits
        hooks = count_hooks(model)
        with pytest.raises(ValueError, match=match):
            vtprune.apply(model, method, **opts)
        assert vtprune.api.handle_of(model) is first and count_hooks(model) == hooks
        assert torch.equal(model(**kw).logits, before)
        vtprune.remove(model)
        assert count_hooks(model) == base


def test_a_failure_while_installing_rolls_back_to_the_previous_plan(monkeypatch):
    """Whatever fails half-way through installing hooks, the model is exactly as before."""
    from vtprune.runtime import vision

    model = _llava()
    kw = tiny.inputs("llava", model, [1], seed=2)
    base = count_hooks(model)
    with torch.no_grad():
        ref = model(**kw).logits
        vtprune.apply(model, "fastv", keep=0.5)
        pruned = model(**kw).logits
        hooks = count_hooks(model)

        def broken(self, handles):  # the tower probe fails after registering its hooks
            original(self, handles)
            raise RuntimeError("disk on fire")

        original = vision.ClsProbe.install
        monkeypatch.setattr(vision.ClsProbe, "install", broken)
        with pytest.raises(RuntimeError, match="disk on fire"):
            vtprune.apply(model, "hired", keep=0.5)
        monkeypatch.undo()
        assert count_hooks(model) == hooks
        assert torch.equal(model(**kw).logits, pruned)
        vtprune.remove(model)
        assert count_hooks(model) == base and "get_image_features" not in vars(model.model)
        assert torch.equal(model(**kw).logits, ref)


# -- copies, threads, nesting, stale handles -----------------------------------------------------
def test_a_deep_copy_carries_its_own_working_plan():
    model = _llava()
    kw = tiny.inputs("llava", model, [1], seed=3)
    base = count_hooks(model)
    with torch.no_grad():
        ref = model(**kw).logits
        vtprune.apply(model, "pdrop", keep=0.4)
        pruned = model(**kw).logits
        clone = copy.deepcopy(model)
        assert vtprune.api.handle_of(clone) is not None
        assert torch.equal(clone(**kw).logits, pruned)
        assert vtprune.stats(clone).keep_ratio < 0.6
        vtprune.remove(clone)
        assert count_hooks(clone) == base and "__deepcopy__" not in vars(clone)
        assert torch.equal(clone(**kw).logits, ref)
        # the original keeps its plan, and its own remove still reaches every hook
        assert torch.equal(model(**kw).logits, pruned)
        vtprune.remove(model)
        assert count_hooks(model) == base and torch.equal(model(**kw).logits, ref)


def test_stats_are_per_request_across_threads():
    model = _llava()
    small = tiny.inputs("llava", model, [1], seed=4)
    big = tiny.inputs("llava", model, [2], seed=5)
    vtprune.apply(model, "uniform", keep=0.25)
    wrong, barrier = [], threading.Barrier(2)

    def worker(kw, expected):
        barrier.wait()
        for _ in range(8):
            with torch.no_grad():
                out = model(**kw)
            if (
                vtprune.stats(model).visual_tokens_in != expected
                or vtprune.stats(out).visual_tokens_in != expected
            ):
                wrong.append(expected)

    threads = [threading.Thread(target=worker, args=a) for a in ((small, 64), (big, 128))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    vtprune.remove(model)
    assert wrong == []


def test_stats_of_a_generate_output_are_that_requests():
    model = _llava()
    kw = tiny.inputs("llava", model, [2], seed=6)
    with vtprune.pruned(model, "fastv", keep=0.5):
        out = model.generate(**kw, max_new_tokens=2, return_dict_in_generate=True)
        model(**tiny.inputs("llava", model, [1], seed=6))  # a later request on the same model
        assert vtprune.stats(out).visual_tokens_in == 128
        assert vtprune.stats(compat.output_cache(out)).visual_tokens_in == 128
        assert vtprune.stats(model).visual_tokens_in == 64
    with pytest.raises(ValueError, match="carries no pruned request"):
        vtprune.stats(object())


@pytest.mark.parametrize("first_on_outer", [True, False])
def test_a_plan_on_the_inner_and_the_outer_model_is_refused(first_on_outer):
    model = _llava()
    base = count_hooks(model)
    first, second = (model, model.model) if first_on_outer else (model.model, model)
    vtprune.apply(first, "fastv", keep=0.5)
    where = "outer" if first_on_outer else "inner"
    with pytest.raises(ValueError, match=f"a plan \\(fastv\\) is already applied to the {where}"):
        vtprune.apply(second, "pdrop", keep=0.5)
    vtprune.remove(first)
    assert count_hooks(model) == base


def test_removing_a_replaced_handle_leaves_the_current_plan():
    model = _llava()
    kw = tiny.inputs("llava", model, [1], seed=8)
    base = count_hooks(model)
    old = vtprune.apply(model, "fastv", keep=0.5)
    current = vtprune.apply(model, "pdrop", keep=0.5)
    old.remove()
    assert vtprune.api.handle_of(model) is current
    with torch.no_grad():
        model(**kw)
    assert vtprune.stats(model).keep_ratio < 0.9
    current.remove()
    assert count_hooks(model) == base


def test_a_config_object_changed_after_construction_is_checked_again_at_apply():
    model = _llava()
    cfg = vtprune.RandomPrune(keep=0.5, seed=3)
    cfg.seed = "a"
    with pytest.raises(ValueError, match="random: option 'seed'='a'"):
        vtprune.apply(model, cfg)
    assert vtprune.api.handle_of(model) is None
