"""vtprune.tune: a seeded, resumable search under the keep constraint; its plan file applies."""

from __future__ import annotations

import json

import pytest
import tiny
import torch

import vtprune
from vtprune.search import draw_settings

KEEP = 0.25


@pytest.fixture(scope="module")
def shaped():
    """LLaVA-1.5 image geometry (576 tokens; 16 layers to stay quick): keep is met to 2%."""
    model = tiny.llava_shaped(layers=16)
    return model, [tiny.llava_shaped_inputs(seed=1)]


def _logits(model, kw):
    with torch.no_grad():
        return model(**kw).logits


def test_three_trials_deterministic_resumable_and_applies(shaped, tmp_path):
    model, samples = shaped
    a, b = tmp_path / "a" / "tuned.json", tmp_path / "b" / "tuned.json"
    r1 = vtprune.tune(model, "pdrop", samples, keep=KEEP, trials=3, seed=1, out=a, progress=False)
    assert r1.new_trials == 3 and len(r1.trials) == 3 and r1.trials[0]["options"] == {}
    assert len((a.parent / "tuned.trials.jsonl").read_text().splitlines()) == 3
    # the best trial is the lowest feasible score, and the plan file says so
    best = min((t for t in r1.trials if t["feasible"]), key=lambda t: t["score"])
    assert r1.score == best["score"] and r1.options == {"keep": KEEP, **best["options"]}
    # same seed, fresh file: the same settings in the same order, the same scores
    r2 = vtprune.tune(model, "pdrop", samples, keep=KEEP, trials=3, seed=1, out=b, progress=False)
    assert [t["options"] for t in r2.trials] == [t["options"] for t in r1.trials]
    assert [t["score"] for t in r2.trials] == pytest.approx([t["score"] for t in r1.trials])
    # rerun on the same out: nothing new runs, the same answer comes back
    r3 = vtprune.tune(model, "pdrop", samples, keep=KEEP, trials=3, seed=1, out=a, progress=False)
    assert r3.new_trials == 0 and r3.options == r1.options
    # a bigger budget runs only the missing trials
    r4 = vtprune.tune(model, "pdrop", samples, keep=KEEP, trials=5, seed=1, out=a, progress=False)
    assert r4.new_trials == 2 and [t["options"] for t in r4.trials[:3]] == [t["options"] for t in r1.trials]
    assert len((a.parent / "tuned.trials.jsonl").read_text().splitlines()) == 5
    # the plan file round-trips through apply: same config, same outputs, keep within 2%
    plan = vtprune.load_plan(a)
    assert plan == r4.config
    assert json.loads(a.read_text())["options"] == r4.options
    with vtprune.pruned(model, plan):
        got = _logits(model, samples[0])
        measured = vtprune.stats(model).keep_ratio
    with vtprune.pruned(model, "pdrop", **r4.options):
        want = _logits(model, samples[0])
    torch.testing.assert_close(got, want)
    assert abs(measured - KEEP) / KEEP <= 0.02


def test_settings_are_drawn_by_seed_and_differ_between_seeds():
    space = {"layers": [[1, x] for x in range(2, 30)], "score": ["last", "mean"]}
    one = draw_settings(space, 6, seed=0)
    assert one == draw_settings(space, 6, seed=0)
    assert one != draw_settings(space, 6, seed=1)
    assert len({json.dumps(s, sort_keys=True) for s in one}) == 6


def test_space_override_hidden_objective_and_changed_study(shaped, tmp_path):
    model, samples = shaped
    out = tmp_path / "fastv.json"
    r = vtprune.tune(
        model,
        "fastv",
        samples,
        keep=KEEP,
        trials=3,
        space={"layer": [2, 3]},
        objective="hidden",
        out=out,
        progress=False,
    )
    assert [t["options"] for t in r.trials[1:]] in (
        [{"layer": 2}, {"layer": 3}],
        [{"layer": 3}, {"layer": 2}],
    )
    assert all(0 <= t["score"] <= 2 for t in r.trials)
    # a different keep is a different search: its trials may not be mixed into this file
    with pytest.raises(ValueError, match="another search"):
        vtprune.tune(
            model, "fastv", samples, keep=0.5, trials=2, space={"layer": [2]}, out=out, progress=False
        )


def test_unreachable_settings_are_recorded_not_chosen(shaped):
    model, samples = shaped
    # layers=[12, 14] cannot reach keep 0.25 on 16 layers: pdrop refuses it, the search goes on
    r = vtprune.tune(
        model, "pdrop", samples, keep=KEEP, trials=2, space={"layers": [[12, 14]]}, progress=False
    )
    bad = r.trials[1]
    assert not bad["feasible"] and "unreachable" in bad["error"]
    assert r.options == {"keep": KEEP}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"method": "nope"}, "'method'='nope'"),
        ({"keep": 0}, "'keep'=0"),
        ({"trials": 0}, "'trials'=0"),
        ({"seed": 1.5}, "'seed'=1.5"),
        ({"objective": "mse"}, "'objective'='mse'"),
        ({"progress": 1}, "'progress'=1"),
        ({"space": {"keep": [0.5]}}, "names 'keep'"),
        ({"space": {"bogus": [1]}}, "names 'bogus'"),
        ({"space": {"layers": []}}, r"'space'\['layers'\]"),
        ({"samples": []}, "'samples'"),
        ({"out": 3}, "'out'=3"),
        (
            {
                "samples": [
                    {
                        "input_ids": torch.ones(1, 3, dtype=torch.long),
                        "attention_mask": torch.tensor([[1, 1, 0]]),
                    }
                ]
            },
            "right-padded",
        ),
    ],
)
def test_bad_options_are_named(shaped, kwargs, match):
    model, samples = shaped
    args = {"method": "pdrop", "samples": samples, "keep": KEEP, "progress": False, **kwargs}
    method, samples = args.pop("method"), args.pop("samples")
    with pytest.raises(ValueError, match=match):
        vtprune.tune(model, method, samples, **args)


def test_refuses_a_model_with_a_plan_and_bad_plan_files(shaped, tmp_path):
    model, samples = shaped
    with vtprune.pruned(model, "fastv", keep=0.5):
        with pytest.raises(ValueError, match="already has a pruning plan"):
            vtprune.tune(model, "pdrop", samples, keep=KEEP, trials=1, progress=False)
    path = tmp_path / "bad.json"
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a plan file"):
        vtprune.load_plan(path)
    path.write_text(json.dumps({"method": "pdrop", "options": {"ratio": 2}}))
    with pytest.raises(ValueError, match="'ratio'=2"):
        vtprune.load_plan(path)


@pytest.fixture(scope="module")
def space_models():
    """A tiny LLaVA (CLS tower, 8 layers: tower stages have layers to prune after) and Qwen2-VL."""
    return {"llava": tiny.llava(tower_layers=8), "qwen2_vl": tiny.qwen2_vl(tower_depth=5)}


@pytest.mark.parametrize("method", vtprune.method_names())
def test_every_value_of_a_default_space_runs(space_models, method):
    """Each method's default search space only proposes values the method accepts with ``keep`` and
    runs on both families (a space value that raises would make its trials silently infeasible)."""
    from vtprune.config import REGISTRY
    from vtprune.tune import _model_info

    for family, model in space_models.items():
        space = REGISTRY[method].tune_space(_model_info(model), KEEP)
        kw = tiny.inputs(family, model, [1], seed=3)
        for option, values in space.items():
            for value in values:
                with torch.no_grad(), vtprune.pruned(model, method, keep=KEEP, **{option: value}):
                    assert model(**kw).logits.isfinite().all(), (family, option, value)
