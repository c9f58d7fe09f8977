"""The transformers range: one compat module, a signature sentinel, a declared tested range."""

from __future__ import annotations

import dataclasses
import re
import warnings
from pathlib import Path

import pytest
import tiny
import torch
import transformers
from helpers import count_hooks
from transformers import modeling_outputs

import vtprune
from vtprune import compat

FAMILIES = ["llava", "llava_next", "qwen2_vl"]


def test_every_public_name_resolves():
    missing = [name for name in vtprune.__all__ if not hasattr(vtprune, name)]
    assert missing == []


def test_pyproject_declares_exactly_the_tested_range():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    meta = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    spec = next(d for d in meta["project"]["dependencies"] if d.startswith("transformers"))
    assert spec.replace(" ", "") == compat.pip_spec()
    low = re.search(r">=(\d+)\.(\d+)", spec).groups()
    high = re.search(r"<(\d+)\.(\d+)", spec).groups()
    assert tuple(map(int, low)) == compat.OLDEST_TESTED
    assert (int(high[0]), int(high[1]) - 1) == compat.NEWEST_TESTED


def test_installed_release_is_in_the_tested_range():
    assert compat.OLDEST_TESTED <= compat.version_tuple() <= compat.NEWEST_TESTED


@pytest.mark.parametrize("family", FAMILIES)
def test_sentinel_passes_on_the_installed_release(family):
    from vtprune.integrations import adapter_for

    wiring = compat.check_wiring(adapter_for(tiny.BUILDERS[family]()))
    # 5.24 renamed the cache argument; whichever name is installed, every hooked forward agrees
    assert wiring.cache_arg == ("cache" if compat.version_tuple() >= (5, 24) else "past_key_values")


def _renamed(forward, old: str, new: str):
    """``forward`` behind a signature where parameter ``old`` is called ``new``."""
    import inspect

    sig = inspect.signature(forward)
    params = [p.replace(name=new) if p.name == old else p for p in sig.parameters.values()]

    def fake(*args, **kwargs):  # never called: apply must refuse before installing anything
        raise AssertionError("the sentinel let a renamed parameter through")

    fake.__signature__ = sig.replace(parameters=params)
    return fake


@pytest.mark.parametrize(
    "where, old",
    [
        ("layer", "position_embeddings"),
        ("layer", compat.cache_param(transformers.masking_utils.create_causal_mask)),
        ("language_model", "inputs_embeds"),
        ("mm_model", "attention_mask"),
    ],
)
def test_sentinel_names_a_renamed_parameter_and_leaves_the_model_alone(monkeypatch, where, old):
    model = tiny.llava()
    kw = tiny.inputs("llava", model, [1], seed=1)
    with torch.no_grad():
        ref = model(**kw).logits
    module = {
        "layer": model.model.language_model.layers[0],
        "language_model": model.model.language_model,
    }.get(where, model.model)
    cls = type(module)
    monkeypatch.setattr(cls, "forward", _renamed(cls.forward, old, "renamed_" + old))
    hooks = count_hooks(model)
    with pytest.raises(compat.WiringError) as err:
        vtprune.apply(model, "fastv", keep=0.5)
    message = str(err.value)
    assert cls.__name__ in message and transformers.__version__ in message
    assert repr(old) in message or "KV cache" in message
    assert compat.tested_range() in message
    assert count_hooks(model) == hooks
    monkeypatch.undo()
    with torch.no_grad():
        assert torch.equal(model(**kw).logits, ref)


def test_sentinel_names_a_moved_output_field(monkeypatch):
    model = tiny.llava()
    name = compat.cache_param(transformers.masking_utils.create_causal_mask)
    fields = dict(modeling_outputs.BaseModelOutputWithPast.__dataclass_fields__)
    fields.pop(name)
    monkeypatch.setattr(modeling_outputs.BaseModelOutputWithPast, "__dataclass_fields__", fields)
    assert name not in {f.name for f in dataclasses.fields(modeling_outputs.BaseModelOutputWithPast)}
    with pytest.raises(compat.WiringError, match=f"no output field '{name}'"):
        vtprune.apply(model, "pdrop", keep=0.5)


def test_sentinel_catches_generate_handing_the_cache_under_another_name(monkeypatch):
    model = tiny.llava()
    cls = type(model)
    name = compat.cache_param(cls.prepare_inputs_for_generation)
    fake = _renamed(cls.prepare_inputs_for_generation, name, "kv_store")
    monkeypatch.setattr(cls, "prepare_inputs_for_generation", fake)
    with pytest.raises(compat.WiringError, match="prepare_inputs_for_generation"):
        vtprune.apply(model, "pdrop", keep=0.5)


def test_a_newer_release_warns_once_naming_the_tested_range(monkeypatch):
    model = tiny.llava()
    monkeypatch.setattr(transformers, "__version__", "5.31.0")
    monkeypatch.setattr(compat, "_warned_untested", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        vtprune.apply(model, "fastv", keep=0.5)
        vtprune.apply(model, "pdrop", keep=0.5)
    vtprune.remove(model)
    mine = [w for w in caught if "vtprune is tested with transformers" in str(w.message)]
    assert len(mine) == 1
    assert compat.tested_range() in str(mine[0].message) and "5.31.0" in str(mine[0].message)


def test_an_older_release_is_refused_at_import(monkeypatch):
    monkeypatch.setattr(transformers, "__version__", "5.18.2")
    with pytest.raises(ImportError, match=re.escape(compat.pip_spec())):
        compat.check_transformers()


def test_cache_helpers_read_both_names_and_write_the_declared_one():
    assert compat.get_cache({"past_key_values": 1}) == 1
    assert compat.get_cache({"cache": 2, "past_key_values": None}) == 2
    kw = {"past_key_values": None, "cache": None}
    compat.set_cache(kw, 3, "cache")
    assert kw == {"cache": 3}
    out = modeling_outputs.BaseModelOutputWithPast(last_hidden_state=torch.zeros(1))
    assert compat.output_cache(out) is None
