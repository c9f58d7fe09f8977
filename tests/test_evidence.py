"""The kept-on-objects diagnostic reads each plan's real selection on the shipped tiny models."""

from __future__ import annotations

import pytest

from vtprune.eval.harness.evidence import object_cells, object_token_share
from vtprune.eval.harness.fidelity import evidence_table
from vtprune.eval.synthetic.synthvqa import generate_synthvqa
from vtprune.eval.synthetic.tiny_models import load_tiny

ITEMS = generate_synthvqa(8, seed=0, split="test")


def test_object_cells_cover_each_objects_cell():
    item = {"objects": [{"row": 0, "col": 0}, {"row": 3, "col": 3}]}
    cells = object_cells(item, side=12)  # 3x3 tokens per scene cell
    assert cells.shape == (2, 144)
    assert cells.sum(1).tolist() == [9, 9]
    assert cells[0].nonzero()[:, 0].tolist() == [0, 1, 2, 12, 13, 14, 24, 25, 26]
    assert cells[1, 143] and not cells[0, 143]
    with pytest.raises(ValueError, match="not a multiple of the scene grid 4"):
        object_cells(item, side=10)


@pytest.fixture(scope="module", params=["llava", "qwen2_vl"])
def shipped(request):
    return load_tiny(request.param)


def test_keeping_everything_keeps_the_images_share(shipped):
    model, processor = shipped
    share = object_token_share(model, processor, "random:keep=1", ITEMS, batch_size=4)
    assert share["kept_on_objects"] == pytest.approx(share["objects_in_image"])
    assert share["objects_covered"] == 1.0
    assert 0.1 < share["objects_in_image"] < 0.6
    assert object_token_share(model, processor, "baseline", ITEMS) is None


def test_pruned_selection_is_measured_and_tabulated(shipped):
    model, processor = shipped
    shares = {
        p: object_token_share(model, processor, p, ITEMS) for p in ("fastv:keep=0.25", "uniform:keep=0.25")
    }
    for share in shares.values():
        assert 0.0 <= share["kept_on_objects"] <= 1.0 and 0.0 < share["objects_covered"] <= 1.0
    # FastV ranks by the prompt's attention, which the trained models put on the objects
    assert shares["fastv:keep=0.25"]["kept_on_objects"] > shares["fastv:keep=0.25"]["objects_in_image"]
    assert shares["uniform:keep=0.25"]["objects_covered"] == 1.0  # a regular stride hits every scene cell
    table = evidence_table(shares, ["fastv", "uniform"], [0.25])
    assert "| fastv | " in table and "| uniform | " in table
