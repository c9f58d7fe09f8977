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
    "vtprune.stages",
    "vtprune.flops",
    "vtprune.config",
    "vtprune.compose",
    "vtprune.methods.fastv",
    "vtprune.methods.pdrop",
    "vtprune.methods.baselines",
    "vtprune.runtime.tokens",
    "vtprune.integrations",
    "vtprune.integrations.base",
    "vtprune.demo",
    "vtprune.cli",
    "vtprune.eval.speed.bench_prefill",
    "vtprune.eval.speed.bench_gemm",
    "vtprune.eval.harness.evidence",
    "vtprune.eval.harness.reports",
    "vtprune.eval.speed.flops_report",
    "vtprune.eval.speed.shapes",
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
