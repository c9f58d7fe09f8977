"""Qwen3-VL: DeepStack features follow the kept tokens (vision stages and early prefill stages).

The references never go through vtprune's runtime: they take the language model's own inputs
from an unpruned forward (embeddings, 3-D positions, DeepStack mask and features), remove the
dropped tokens by plain indexing, and run the decoder, adding each DeepStack feature to the
hidden state of the token it belongs to.
"""

from __future__ import annotations

import pytest
import tiny
import torch
from helpers import module_inputs

import vtprune


@pytest.fixture(scope="module")
def model():
    return tiny.qwen3_vl()


def _lm_inputs(model, kw) -> dict:
    """The keyword arguments the multimodal model hands its language model (unpruned forward)."""
    return module_inputs(model, kw, model.model.language_model)[1]


def _kept(model, kw, method, **opts):
    """Last-position logits of the pruned model and the original positions each stage kept."""
    with torch.no_grad(), vtprune.pruned(model, method, **opts):
        logits = model(**kw).logits[0, -1]
        selections = vtprune.stats(model).selections
    return logits, selections


def _keep_columns(lm: dict, kept_visual: torch.Tensor) -> torch.Tensor:
    """Sequence columns that survive: every text token plus the kept visual ones (one row)."""
    visual = lm["visual_pos_masks"][0]
    keep = ~visual
    keep[kept_visual] = True
    return torch.nonzero(keep).flatten()


def _feature_rows(lm: dict, cols: torch.Tensor) -> torch.Tensor:
    """Rows of the DeepStack features (row-major over the visual mask) of the visual ``cols``."""
    visual = lm["visual_pos_masks"][0]
    rank = visual.long().cumsum(0) - 1
    return rank[cols[visual[cols]]]


def _run_layers(model, lm: dict, cols_per_layer: list[torch.Tensor], shuffle=False) -> torch.Tensor:
    """Decoder layers run by hand on one row, layer ``i`` over the columns ``cols_per_layer[i]``
    (original positions kept), DeepStack feature ``i`` added after layer ``i`` to the visual tokens
    present. ``shuffle`` hands the features to the wrong tokens (the check has teeth)."""
    text = model.model.language_model
    pos = lm["position_ids"]
    pos = pos[1:] if pos.shape[0] == 4 else pos
    visual = lm["visual_pos_masks"][0]
    feats = lm["deepstack_visual_embeds"]
    with torch.no_grad():
        hidden = lm["inputs_embeds"]
        cos, sin = text.rotary_emb(hidden, pos)
        held = torch.arange(hidden.shape[1])
        for i, layer in enumerate(text.layers):
            cols = cols_per_layer[i]
            where = torch.nonzero(torch.isin(held, cols)).flatten()
            hidden, held = hidden[:, where], held[where]
            rotary = (cos[:, held], sin[:, held])
            hidden = layer(hidden, position_embeddings=rotary, attention_mask=None, use_cache=False)
            if i < len(feats):
                rows = _feature_rows(lm, held)
                if shuffle:
                    rows = rows.flip(0)
                hidden = hidden.clone()
                hidden[0, visual[held]] += feats[i][rows]
        return model.lm_head(text.norm(hidden))[0, -1]


@pytest.mark.parametrize("media", ["i", "ivi"])
@pytest.mark.parametrize("method", ["random", "divprune"])
def test_vision_stage_prunes_deepstack_rows_with_the_tokens(model, media, method):
    kw = tiny.media_inputs("qwen3_vl", [media], seed=21)
    lm = _lm_inputs(model, kw)
    got, selections = _kept(model, kw, method, keep=0.4)
    cols = _keep_columns(lm, selections[method][0])
    ref = _run_layers(model, lm, [cols] * tiny.LAYERS)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    wrong = _run_layers(model, lm, [cols] * tiny.LAYERS, shuffle=True)
    assert not torch.allclose(got, wrong, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("layer", [1, 2])
def test_prefill_stage_before_the_last_injection_reindexes_deepstack(model, layer):
    """FastV before decoder layer 1 or 2: DeepStack features 1 and 2 are added after those layers,
    so they must land on the tokens still present there (and the dropped ones' are gone)."""
    kw = tiny.media_inputs("qwen3_vl", ["iv"], seed=22)
    lm = _lm_inputs(model, kw)
    got, selections = _kept(model, kw, "fastv", layer=layer, keep=0.5)
    everything = torch.arange(kw["input_ids"].shape[1])
    (kept,) = selections.values()
    cols = _keep_columns(lm, kept[0])
    plan = [everything] * layer + [cols] * (tiny.LAYERS - layer)
    ref = _run_layers(model, lm, plan)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got, _run_layers(model, lm, plan, shuffle=True), rtol=1e-4, atol=1e-5)


def test_injection_method_is_shadowed_and_restored(model):
    text = model.model.language_model
    assert "_deepstack_process" not in vars(text)
    with vtprune.pruned(model, "fastv", keep=0.5):
        assert "_deepstack_process" in vars(text)
    assert "_deepstack_process" not in vars(text)


@pytest.mark.parametrize("method", ["uniform", "fastv"])
def test_video_timestamps_and_frame_delimiters_stay(model, method):
    """Each frame's timestamp and vision start / end tokens are text: every stage keeps them, and
    a quarter of the frames' tokens survive across the clip."""
    from vtprune import compat
    from vtprune.runtime.state import state_of_cache

    kw = tiny.media_inputs("qwen3_vl", ["v"], seed=23, frames=4)
    ids = kw["input_ids"][0]
    with torch.no_grad(), vtprune.pruned(model, method, keep=0.25):
        out = model(**kw)
        ratio = vtprune.stats(model).keep_ratio
    final = state_of_cache(compat.output_cache(out)).sets[-1]
    kept = final.orig_index[0][final.present[0]]
    text = torch.nonzero(ids != tiny.VIDEO).flatten()
    assert bool(torch.isin(text, kept).all())
    assert int((ids == tiny.VSTART).sum()) == int((ids == tiny.VEND).sum()) == 4
    assert abs(ratio - 0.25) < 0.02


def test_sentinel_names_a_missing_injection_method(model, monkeypatch):
    """A transformers release without the DeepStack method the runtime shadows is refused at
    ``apply``, naming it, before any hook is installed."""
    from helpers import count_hooks

    from vtprune import compat

    hooks = count_hooks(model)
    monkeypatch.delattr(type(model.model.language_model), "_deepstack_process")
    with pytest.raises(compat.WiringError, match="_deepstack_process"):
        vtprune.apply(model, "fastv", keep=0.5)
    assert count_hooks(model) == hooks and "_deepstack_process" not in vars(model.model.language_model)


def test_tiny_model_does_not_depend_on_the_global_rng():
    """Regression: ``tiny.qwen3_vl`` ignored ``seed``, so a module-scoped fixture got different
    weights in every run; batch == rows then failed on some draws (argmax near-ties between the
    padded batch and the rows alone) and looked like state left over by earlier tests."""
    torch.manual_seed(1)
    a = tiny.qwen3_vl().state_dict()
    torch.manual_seed(2)
    b = tiny.qwen3_vl().state_dict()
    assert all(torch.equal(v, b[k]) for k, v in a.items())


@pytest.mark.parametrize("method", ["fastv", "divprune"])
def test_left_padded_generate_after_a_pruned_forward_and_remove(model, method):
    """A direct pruned forward leaves the model's batch-1 ``rope_deltas`` behind (as any plain
    forward does); a later pruned left-padded ``generate`` must still equal its rows alone."""
    from helpers import greedy, row_alone

    one = tiny.inputs("qwen3_vl", model, [1], seed=2)
    with torch.no_grad():
        handle = vtprune.apply(model, method, keep=0.5)
        model(**one)
        handle.remove()
        model(**one)
    assert model.model.rope_deltas.shape[0] == 1
    images = [1, 2, 0]
    kw = tiny.inputs("qwen3_vl", model, images, side="left", seed=4, sizes=[(8, 12), (8, 8), (12, 8)])
    with vtprune.pruned(model, method, keep=0.5):
        batch = greedy(model, kw, 5)
        rows = [greedy(model, row_alone("qwen3_vl", kw, b, images), 5) for b in range(len(images))]
    assert torch.equal(batch, torch.cat(rows))
