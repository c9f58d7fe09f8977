"""The lmms-eval plugin: imports without lmms-eval; with it, is found through entry points and answers."""

from __future__ import annotations

import importlib
import importlib.metadata as md
import sys

import pytest

from vtprune.eval.harness.lmms_plugin import MODEL_ID, plan_string

ENTRY_POINT = f"{MODEL_ID} = vtprune.eval.harness.lmms_plugin:lmms_manifests"


def _lmms():
    return pytest.importorskip("lmms_eval.api.model", reason="lmms-eval is not installed")


def test_module_imports_without_lmms_eval_and_builds_plans():
    assert plan_string("pdrop", {"layers": "8+16+24", "ratio": 0.5}) == "pdrop:layers=8+16+24,ratio=0.5"
    assert plan_string("baseline", {}) == "baseline"
    with pytest.raises(ValueError, match="without a method"):
        plan_string(None, {"keep": 0.25})


@pytest.fixture
def fake_dist(tmp_path, monkeypatch):
    """A distribution on sys.path declaring the entry point exactly as pyproject will."""
    info = tmp_path / "vtprune_lmms_check-0.0.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: vtprune-lmms-check\nVersion: 0.0.0\n")
    (info / "entry_points.txt").write_text(f"[lmms_eval.models]\n{ENTRY_POINT}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    return info


def test_entry_point_registers_the_model_class(fake_dist):
    api = _lmms()
    from lmms_eval.models.registry_v2 import ModelRegistryV2

    eps = [ep for ep in md.entry_points(group="lmms_eval.models") if ep.name == MODEL_ID]
    assert eps and eps[0].value == "vtprune.eval.harness.lmms_plugin:lmms_manifests"
    registry = ModelRegistryV2()
    registry.load_entrypoint_manifests()
    cls = registry.get_model_class(MODEL_ID)
    assert issubclass(cls, api.lmms) and cls.__name__ == "VtpruneLlavaHf" and cls.is_simple


def test_installed_vtprune_declares_the_entry_point():
    _lmms()
    from lmms_eval.models import get_model

    declared = [ep for ep in md.distribution("vtprune").entry_points if ep.group == "lmms_eval.models"]
    if not declared:
        pytest.skip(
            "the installed vtprune has no lmms_eval.models entry point yet (add it to pyproject, reinstall)"
        )
    assert get_model(MODEL_ID).__name__ == "VtpruneLlavaHf"


def test_generate_until_and_loglikelihood_on_a_pruned_tiny_model(tmp_path):
    _lmms()
    from lmms_eval.api.instance import Instance

    from vtprune.eval.synthetic.synthvqa import generate_synthvqa
    from vtprune.eval.synthetic.tiny_models import build_tiny, save_tiny

    save_tiny(*build_tiny("llava", text_layers=2, vision_layers=2), str(tmp_path / "m"))
    from vtprune.eval.harness.lmms_plugin import VtpruneLlavaHf as cls

    lm = cls.create_from_arg_string(
        f"pretrained={tmp_path / 'm'},method=pdrop,keep=0.75,device=cpu", {"batch_size": 2}
    )
    items = generate_synthvqa(3)
    lm.task_dict = {"synth": {"test": {i: it for i, it in enumerate(items)}}}
    to_visual = lambda doc: [doc["image"]]  # noqa: E731
    meta = lambda i: {"task": "synth", "doc_id": i, "repeats": 1}  # noqa: E731
    gen = [
        Instance("generate_until", (it["question"], {"max_new_tokens": 2, "until": ["</s>"]}, to_visual, i, "synth", "test"), i, meta(i))
        for i, it in enumerate(items)
    ]  # fmt: skip
    answers = lm.generate_until(gen)
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)
    import vtprune

    assert vtprune.stats(lm.model).equivalent_tokens == 108.0  # the plan really ran: 144 -> 72 at layer 1
    ll = lm.loglikelihood(
        [Instance("loglikelihood", (it["question"], " yes", to_visual, i, "synth", "test"), i, meta(i)) for i, it in enumerate(items)]
    )  # fmt: skip
    assert len(ll) == 3 and all(lp <= 0 and isinstance(g, bool) for lp, g in ll)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
