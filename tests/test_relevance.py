"""Instruction relevance sources: each against a plain formula, and CDPruner's ``relevance=``
option choosing the kept set the official rule chooses with that source."""

from __future__ import annotations

import pytest
import tiny
import torch
from helpers import image_runs
from test_cdpruner import CASES, _instruction, _run, official_rule

from vtprune.relevance import cosine_to_instruction, instruction_relevance


def plain(features: torch.Tensor, text: torch.Tensor, source: str) -> list[float]:
    """The sources written out row by row in float64."""
    out = []
    for f in features.double():
        cos = [float(torch.nn.functional.cosine_similarity(f, t, dim=0)) for t in text.double()]
        if source == "tokens":
            out.append(sum(cos) / len(cos))
        elif source == "last":
            out.append(cos[-1])
        else:
            out.append(float(torch.nn.functional.cosine_similarity(f, text.double().mean(0), dim=0)))
    return out


@pytest.mark.parametrize("source", ["tokens", "last", "centroid"])
def test_sources_equal_the_plain_formulas(source):
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(20, 8, generator=g), torch.randn(5, 8, generator=g)
    got = cosine_to_instruction(x, text, source)
    torch.testing.assert_close(got.double(), torch.tensor(plain(x, text, source), dtype=torch.float64))
    r = torch.tensor(plain(x, text, source))
    for negate in (True, False):
        s = -r if negate else r
        ref = (s - s.min() + 1e-6) / (s.max() - s.min())
        torch.testing.assert_close(instruction_relevance(x, text, negate, source), ref, rtol=1e-5, atol=1e-6)


def test_unknown_source_is_named():
    with pytest.raises(
        ValueError, match="relevance source 'first' is invalid; allowed: 'tokens', 'last', 'centroid'"
    ):
        cosine_to_instruction(torch.ones(2, 2), torch.ones(1, 2), "first")


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("source", ["last", "centroid"])
def test_cdpruner_relevance_option_follows_the_source(family, source):
    """Cosine to one vector (the last instruction token, or the mean instruction embedding) is the
    official rule with that single vector as the text."""
    model = tiny.BUILDERS[family]()
    case = CASES[family]
    kw = tiny.inputs(family, model, case["images"], seed=21, sizes=case["sizes"])
    x, kept = _run(model, kw, keep=0.12, relevance=source)
    expected = [[] for _ in case["images"]]
    for row, pos in image_runs(kw["input_ids"]):
        k = int(0.12 * pos.numel() + 0.5)
        text = x[row, _instruction(kw["input_ids"][row], kw["attention_mask"][row])]
        text = text[-1:] if source == "last" else text.mean(0, keepdim=True)
        expected[row] += pos[official_rule(x[row, pos], text, k)].tolist()
    assert [k.tolist() for k in kept] == [sorted(e) for e in expected]
