"""End to end on the shipped tiny models: the harness, keep-everything plans, the fidelity table."""

from __future__ import annotations

import json

import pytest

from vtprune.config import method_names
from vtprune.eval.harness.cli_eval import main as eval_main
from vtprune.eval.harness.fidelity import fidelity_table, plans

KEEP_ALL = {"layerskip": "layerskip:keep=1"}  # every other method: method:keep=1


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl"])
def test_harness_on_shipped_model_keep_everything_equals_unpruned(arch, tmp_path):
    methods = method_names()
    keep_all = [KEEP_ALL.get(m, f"{m}:keep=1") for m in methods]
    out = tmp_path / arch
    eval_main(
        ["--model", arch, "--tasks", "synthvqa", "--limit", "24", "--output", str(out)]
        + ["--plans", ",".join(["baseline", *keep_all, "fastv:keep=0.11"]), "--max-new-tokens", "3"]
    )
    results = json.loads((out / "results.json").read_text())
    task = results["tasks"]["synthvqa"]["plans"]
    base = task["baseline"]
    assert base["main_score"] >= 0.6  # chance is about 0.35 (yes/no 0.5, colour and count 0.2)
    for plan in keep_all:
        assert task[plan]["loyalty"] == 1.0, plan  # same answer on every question
        assert task[plan]["main_score"] == base["main_score"]
    pruned = task["fastv:keep=0.11"]["meters"]
    assert pruned["equivalent_tokens"] < 0.12 * base["meters"]["equivalent_tokens"]
    assert pruned["flops_counted"] < base["meters"]["flops_counted"]

    table = fidelity_table(results, ["fastv"], [0.11])
    assert f"accuracy {base['main_score']:.3f}" in table and "| fastv | " in table


def test_fidelity_plans_cover_every_method_and_keep():
    got = plans(["fastv", "hired"], [0.5, 0.11])
    assert got == ["baseline", "fastv:keep=0.5", "hired:keep=0.5", "fastv:keep=0.11", "hired:keep=0.11"]
