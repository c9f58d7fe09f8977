"""The examples in public docstrings run (those not marked +SKIP)."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "vtprune.selection",
    "vtprune.images",
    "vtprune.diversity",
    "vtprune.methods.divprune",
    "vtprune.methods.vflowopt",
    "vtprune.search",
    "vtprune.tune",
    "vtprune.eval.harness.tune_report",
    "vtprune.scoring",
    "vtprune.methods.temporal",
    "vtprune.methods.todre",
    "vtprune.methods.vscan",
    "vtprune.clustering",
    "vtprune.methods.sparsevlm",
    "vtprune.methods.flowcut",
    "vtprune.methods.zerotprune",
    "vtprune.attention_graph",
    "vtprune.methods.cdpruner",
    "vtprune.relevance",
    "vtprune.recycling",
    "vtprune.methods.dart",
    "vtprune.methods.transprune",
    "vtprune.methods.prefixkv",
    "vtprune.kv_budget",
    "vtprune.kv_profile",
    "vtprune.eval.speed.bench_prefixkv",
    "vtprune.stages",
    "vtprune.flops",
    "vtprune.config",
    "vtprune.compose",
    "vtprune.methods.fastv",
    "vtprune.methods.pdrop",
    "vtprune.methods.baselines",
    "vtprune.runtime.tokens",
    "vtprune.runtime.injection",
    "vtprune.runtime.survivors",
    "vtprune.integrations",
    "vtprune.integrations.base",
    "vtprune.integrations.llava_onevision",
    "vtprune.demo",
    "vtprune.cli",
    "vtprune.eval.speed.bench_prefill",
    "vtprune.eval.speed.bench_gemm",
    "vtprune.eval.harness.evidence",
    "vtprune.eval.harness.fidelity",
    "vtprune.eval.synthetic.tiny_models",
    "vtprune.eval.harness.reports",
    "vtprune.eval.speed.flops_report",
    "vtprune.eval.speed.shapes",
    "vtprune.eval.speed.bench_selection",
    "vtprune.eval.synthetic.synthvqa_video",
    "vtprune.eval.harness.fidelity_video",
    "vtprune.eval.speed.bench_tower",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    import torch

    import vtprune
    from vtprune.config import ModelInfo

    globs = {"torch": torch, "vtprune": vtprune, "ModelInfo": ModelInfo}
    result = doctest.testmod(module, extraglobs=globs, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
