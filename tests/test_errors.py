"""Bad input gets a clear error naming the option, the value and what is allowed."""

from __future__ import annotations

import dataclasses

import pytest
import tiny
import torch
from transformers import DynamicCache

import vtprune
from vtprune import compat


@pytest.fixture(scope="module")
def model():
    return tiny.llava()


@pytest.mark.parametrize(
    "method, opts, match",
    [
        (
            "nope",
            {},
            # every registered method, sorted (the list grows with each method)
            "unknown method 'nope'; available: " + ", ".join(sorted(vtprune.config.REGISTRY)),
        ),
        ("fastv", {"kep": 0.5}, "unknown option"),
        (
            "divprune",
            {"video_budget": "tubelet"},
            "'video_budget'='tubelet' is invalid; allowed: 'clip', 'frame'",
        ),
        ("temporal", {"video_budget": "frame"}, "unknown option"),  # ranks over the whole clip
        (
            "temporal",
            {"min_per_frame": 1.5},
            r"'min_per_frame'=1.5 is invalid; allowed: a number in \[0, 1\]",
        ),
        ("fastv", {"keep": 0}, r"'keep'=0 is invalid; allowed: a number in \(0, 1\]"),
        ("pdrop", {"keep": 1.5}, r"'keep'=1.5 is invalid"),
        ("random", {"keep": "half"}, r"'keep'='half' is invalid"),
        ("fastv", {"layer": 0}, r"'layer'=0 is out of range; allowed: an integer in 1..7"),
        ("fastv", {"layer": 40}, r"'layer'=40 is out of range"),
        ("fastv", {"keep": 0.5, "ratio": 0.5}, "either 'keep' or 'ratio'"),
        ("fastv", {"score": "max"}, r"'score'='max' is invalid; allowed: 'last', 'mean'"),
        ("fastv", {"keep": 0.1, "layer": 4}, r"keep=0.1 is unreachable with layer=4"),
        ("pdrop", {"layers": [4, 2]}, "strictly increasing"),
        ("pdrop", {"layers": [2, 9]}, r"'layers'=9 is out of range"),
        ("pdrop", {"ratio": 0}, r"'ratio'=0 is invalid"),
        ("pdrop", {"keep": 0.3, "layers": [4, 6]}, "unreachable with layers"),
        ("hired", {"alpha": 2}, r"'alpha'=2 is invalid"),
        ("hired", {"keep": 0.3, "budget": 0.2}, "either 'keep' or 'budget'"),
        ("visionzip", {"dominant": -1}, r"'dominant'=-1 is invalid; allowed: an integer >= 0"),
        ("visionzip", {"keep": 0.3, "dominant": 5}, "either 'keep' or 'dominant'"),
        ("mustdrop", {"preset": "100"}, r"'preset'='100' is invalid; allowed: '192', '128', '64'"),
        ("mustdrop", {"window": 1}, r"'window'=1 is invalid"),
        ("mustdrop", {"keep": 0.3, "preset": "64"}, "either 'keep' or thresholds"),
        ("todre", {"layer": 8}, r"'layer'=8 is out of range; allowed: an integer in 1..7"),
        ("todre", {"split": 1.5}, r"'split'=1.5 is invalid; allowed: a number in \[0, 1\]"),
        ("vscan", {"layer": 8}, r"vscan: option 'layer'=8 is out of range; allowed: an integer in 1..7"),
        ("vscan", {"window": 0}, r"vscan: option 'window'=0 is invalid; allowed: an integer >= 1"),
        ("vscan", {"local_layer": 3}, r"'local_layer'=3 is out of range; allowed: an integer in -3..2"),
        (
            "random",
            {"seed": -1},
            r"random: option 'seed'=-1 is invalid; allowed: an integer in 0..4294967295",
        ),
        ("layerskip", {"cut": 9}, r"layerskip: option 'cut'=9 is invalid; allowed: True or False"),
        ("layerskip", {"thin_ffn": True, "ffn_layers": [-1]}, r"'ffn_layers'=\[-1\] is invalid"),
        ("hired", {"split_layer": 1.0}, r"'split_layer'=1.0 is invalid; allowed: an integer"),
        ("dart", {"pivot_image": 0, "pivot_text": 0}, "both 0; allowed: at least one pivot"),
        ("dart", {"pivot_score": "attn"}, r"'pivot_score'='attn' is invalid; allowed: 'k_norm'"),
        ("dart", {"keep": 0.5, "ratio": 0.2}, "either 'keep' or 'ratio'"),
        ("dart", {"keep": 0.1, "layer": 4}, r"dart: keep=0.1 is unreachable with layer=4"),
        ("transprune", {"keep": 0.5, "ratios": [0.5]}, "either 'keep' or 'ratios'"),
        (
            "transprune",
            {"ratios": [0.5, 0.8, 0.1]},
            r"'ratios'=\[0.5, 0.8, 0.1\] is invalid; allowed: a non-empty, non-inc",
        ),
        ("transprune", {"score": "attn"}, r"'score'='attn' is invalid; allowed: 'ttv\+iga', 'ttv', 'iga'"),
        ("transprune", {"layers": [2, 4]}, "has 2 boundaries but there are 3 ratios"),
        (
            "transprune",
            {"layers": [2, 4], "ratios": [0.5, 0.2], "window": [4]},
            r"'window'=\[4\] is out of range",
        ),
        ("prefixkv", {"sink": -1}, r"prefixkv: option 'sink'=-1 is invalid; allowed: an integer >= 0"),
    ],
)
def test_bad_options_raise_value_error(model, method, opts, match):
    with pytest.raises(ValueError, match=match):
        vtprune.apply(model, method, **opts)
    assert vtprune.api.handle_of(model) is None


# A value of the wrong type for every option of every registered method.
WRONG_TYPE = {
    "fastv": {"keep": "half", "layer": 2.0, "ratio": "0.5", "score": 1},
    "pdrop": {"keep": [0.5], "layers": "8,16", "ratio": True},
    "random": {"keep": "0.5", "seed": "a", "protect_newlines": 1, "recycle": 1},
    "uniform": {"keep": "0.5", "protect_newlines": "yes", "recycle": True},
    "divprune": {"keep": "0.1", "per_crop": 1, "recycle": "mean"},
    "flowcut": {"keep": "0.1", "smoothing": "half"},
    "zerotprune": {"keep": "0.1", "layers": "3", "iterations": 30.0, "similarity": "half"},
    "vflowopt": {"keep": "0.1", "threshold": "39", "cell": "4", "layer": 1.0},
    "cdpruner": {
        "keep": "0.1",
        "quality": "exp",
        "theta": 1.0,
        "negate": 0,
        "per_crop": "no",
        "relevance": 2,
        "recycle": None,
    },
    "temporal": {"keep": "0.25", "min_per_frame": "0.5"},
    "todre": {"keep": "0.1", "layer": 2.0, "split": "0.5", "score": 1, "init": "center"},
    "sparsevlm": {"keep": "0.1", "budget": 64.0, "layers": "2,6,15", "recycle": 1},
    "vscan": {
        "keep": "0.1",
        "layer": 4.0,
        "split": "1/3",
        "local_layer": "5",
        "global_layer": 1.5,
        "window": 0,
        "local_share": None,
        "merge": 1,
    },
    "dart": {
        "keep": "0.5",
        "layer": 2.0,
        "ratio": "0.2",
        "pivot_image": 4.0,
        "pivot_text": "4",
        "pivot_score": 1,
    },
    "transprune": {"keep": "0.5", "layers": "7,9,12", "ratios": "0.5", "window": 6, "score": 1},
    "hired": {
        "keep": True,
        "budget": "0.2",
        "alpha": None,
        "split_layer": 1.5,
        "select_layer": "last",
        "drop_newlines": 0,
        "recycle": ["nearest"],
        "score": "pagerank",
    },
    "layerskip": {
        "keep": "1",
        "cut": 9,
        "cut_layer": 4.0,
        "thin_ffn": "yes",
        "ffn_ratio": 2.5,
        "ffn_layers": 3,
        "window": "3",
        "window_layers": ["a"],
        "head_mask": 5,
        "renormalize": 0,
    },
    "mustdrop": {
        "keep": "x",
        "preset": 192,
        "global_thr": "0.1",
        "individual_thr": [0.1],
        "layers": "2",
        "merge_threshold": "high",
        "window": 3.0,
        "key_ratio": "0.08",
        "decode": "true",
    },
    "prefixkv": {"keep": "0.3", "profile": 5, "sink": 4.0},
    "visionzip": {
        "keep": "x",
        "dominant": 5.0,
        "contextual": "10",
        "layer": "-2",
        "merge": "sum",
        "drop_newlines": 1,
        "score": 1,
        "share": "0.8",
    },
}
# the video-budget option every image vision-stage method shares (vtprune.config.VideoBudget)
VIDEO_BUDGET = [
    "random",
    "uniform",
    "divprune",
    "cdpruner",
    "todre",
    "hired",
    "mustdrop",
    "visionzip",
    "vscan",
    "vflowopt",
]
for _method in VIDEO_BUDGET:
    WRONG_TYPE[_method]["video_budget"] = 1


def _every_option():
    """(method, option) for every init field of every registered config, read from the registry:
    an option added later gets a case here without anyone remembering to add it."""
    return [
        (name, f.name)
        for name in vtprune.method_names()
        for f in dataclasses.fields(vtprune.REGISTRY[name])
        if f.init
    ]


@pytest.mark.parametrize("method, option", _every_option())
def test_every_option_is_validated(model, method, option):
    assert option in WRONG_TYPE.get(method, {}), (
        f"{method} has an option {option!r} without a wrong-typed value in WRONG_TYPE: add one, and "
        f"make {method}'s validate() refuse it"
    )
    value = WRONG_TYPE[method][option]
    vtprune.remove(model)  # whatever an earlier test left
    with pytest.raises(ValueError) as err:
        vtprune.apply(model, method, **{option: value})
    message = str(err.value)
    assert message.startswith(f"{method}: option {option!r}={value!r}") and "allowed: " in message, message
    assert vtprune.api.handle_of(model) is None


def test_wrong_type_table_has_no_stale_entries():
    options = {}
    for method, option in _every_option():
        options.setdefault(method, set()).add(option)
    assert {m: set(o) for m, o in WRONG_TYPE.items()} == options


@pytest.mark.parametrize(
    "plan", ["random:seed=abc", "layerskip:cut=9", "pdrop:layers=8", "hired:drop_newlines=1"]
)
def test_bad_plan_strings_fail_at_apply(model, plan):
    # `vtprune eval` checks every plan up front by applying it: it must fail there, not mid-run
    from vtprune.eval.harness.plans import parse_plan

    name, options = parse_plan(plan)
    with pytest.raises(ValueError, match=f"{name}: option '{next(iter(options))}'="):
        vtprune.apply(model, name, **options)


def test_unsupported_model_lists_supported():
    with pytest.raises(TypeError, match="does not support Linear; supported: LlavaForConditionalGeneration"):
        vtprune.apply(torch.nn.Linear(2, 2), "fastv")


def test_static_cache_is_refused(model):
    kw = tiny.inputs("llava", model, [1])
    with (
        vtprune.pruned(model, "fastv"),
        pytest.raises(NotImplementedError, match="StaticCache is not supported"),
    ):
        model.generate(**kw, max_new_tokens=2, cache_implementation="static")


def test_compiled_forward_is_refused(model, monkeypatch):
    kw = tiny.inputs("llava", model, [1])
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with vtprune.pruned(model, "fastv"), pytest.raises(NotImplementedError, match="torch.compile"):
        model(**kw)


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("fullgraph", [False, True], ids=["graph_breaks", "fullgraph"])
def test_torch_compile_of_a_pruned_model_is_refused(model, fresh_dynamo, grad, fullgraph):
    # Dynamo traces the hooks; a refusal raised while tracing became a graph break and the hook
    # re-ran eagerly, where is_compiling() is False: under no_grad the compiled model ran, with
    # grad AOT autograd failed on an op without a backward. The refusal must reach the caller.
    kw = tiny.inputs("llava", model, [1])
    compiled = torch.compile(model, backend="aot_eager", fullgraph=fullgraph)
    with (
        vtprune.pruned(model, "pdrop", keep=0.5),
        torch.set_grad_enabled(grad),
        pytest.raises(Exception, match="vtprune: torch.compile is not supported") as err,
    ):
        compiled(**kw)
    if not fullgraph:  # fullgraph=True: Dynamo wraps it in its own Unsupported error
        assert err.type is NotImplementedError
    with torch.no_grad():
        assert model(**kw).logits.isfinite().all()  # the uncompiled model still runs


def test_compiling_only_the_decoder_layers_is_refused(fresh_dynamo):
    model = tiny.llava()
    kw = tiny.inputs("llava", model, [1])
    for layer in model.model.language_model.layers:
        layer.compile(backend="eager")
    with (
        torch.no_grad(),
        vtprune.pruned(model, "fastv"),
        pytest.raises(NotImplementedError, match="torch.compile is not supported"),
    ):
        model(**kw)


def test_torch_compile_without_a_plan_is_untouched(model, fresh_dynamo):
    kw = tiny.inputs("llava", model, [1])
    with torch.no_grad():
        want = model(**kw).logits
        got = torch.compile(model, backend="eager")(**kw).logits
    torch.testing.assert_close(got, want)


def test_multi_token_step_on_pruned_cache_is_refused(model):
    kw = tiny.inputs("llava", model, [1])
    with torch.no_grad(), vtprune.pruned(model, "fastv"):
        out = model(**kw)
        nxt = torch.tensor([[5, 6]])
        mask = torch.cat([kw["attention_mask"], torch.ones(1, 2, dtype=torch.long)], 1)
        with pytest.raises(NotImplementedError, match="2-token step on a pruned KV cache"):
            model(input_ids=nxt, attention_mask=mask, **compat.cache_kwargs(compat.output_cache(out)))


def test_cache_filled_without_plan_is_refused(model):
    kw = tiny.inputs("llava", model, [1])
    with torch.no_grad():
        cache = compat.output_cache(model(**kw))
        assert isinstance(cache, DynamicCache)
        with (
            vtprune.pruned(model, "fastv"),
            pytest.raises(NotImplementedError, match="filled without this pruning"),
        ):
            model(**kw, **compat.cache_kwargs(cache))


def test_stats_without_plan_is_a_clear_error():
    with pytest.raises(ValueError, match="no pruning plan is applied"):
        vtprune.stats(tiny.llava())


def test_options_with_config_object_are_refused(model):
    with pytest.raises(ValueError, match="either a name"):
        vtprune.apply(model, vtprune.FastV(), keep=0.5)
