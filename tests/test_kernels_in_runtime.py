"""The runtime through the Triton kernels (interpreted on CPU) equals the reference path."""

from __future__ import annotations

import importlib.util

import pytest
import tiny
import torch

import vtprune

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")


@pytest.mark.parametrize(
    "family, method, opts", [("llava", "pdrop", dict(keep=0.4)), ("qwen2_vl", "fastv", dict(keep=0.5))]
)
def test_triton_kernels_match_reference_inside_the_runtime(monkeypatch, family, method, opts):
    model = tiny.BUILDERS[family]()
    kw = tiny.inputs(family, model, [1, 1], seed=40)
    with torch.no_grad(), vtprune.pruned(model, method, **opts):
        monkeypatch.setenv("VTPRUNE_KERNELS", "reference")
        ref = model(**kw).logits
        ref_sel = vtprune.stats(model).selections
        monkeypatch.setenv("VTPRUNE_KERNELS", "triton")  # CPU tensors + TRITON_INTERPRET=1
        out = model(**kw).logits
        sel = vtprune.stats(model).selections
    assert sel.keys() == ref_sel.keys()
    for key in sel:
        assert all(torch.equal(a, b) for a, b in zip(sel[key], ref_sel[key]))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
