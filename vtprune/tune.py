"""``vtprune.tune``: search a method's hyper-parameters under a ``keep`` constraint.

VFlowOpt's idea (tune the schedule offline so the pruned model stays close to the unpruned one),
for any registered method. ``keep`` is fixed: every method resolves its remaining hyper-parameters
to hit it, so a trial only changes *how* the budget is spent (PyramidDrop's stage boundaries,
MustDrop's merge threshold and filtering layers, FastV's layer, VisionZip's dominant share, ...).

* **Objective.** On each calibration sample the unpruned model runs once (reference values
  cached for the whole search); each trial runs the pruned model and scores, at the answer
  position (the last real prompt token of every row), either ``"kl"``: the KL divergence from the
  unpruned next-token distribution to the pruned one, or ``"hidden"``: one minus the cosine
  similarity of the last hidden state (VFlowOpt's own objective). Lower is better; the mean over
  rows and samples is reported.
* **Constraint.** The measured layer-average keep (``vtprune.stats(model).keep_ratio``, averaged
  over the samples) must be within ``tolerance`` (relative, default 2%) of ``keep``, or no farther
  from it than the default setting's (tiny images round every setting's counts); settings that
  miss it, or that the method refuses (an unreachable layer, say), are infeasible.
* **Search.** Trial 0 is always the method's default settings at ``keep`` (so the result is never
  worse than the default on the calibration data); the rest are distinct settings of the space drawn
  in a seeded random order (``vtprune.search.draw_settings``: a random grid search without repeats;
  the whole grid when ``trials`` exceeds it). No Bayesian optimiser: the spaces are small and
  discrete, and the search must not depend on an optional library.
* **Resume.** With ``out``, every finished trial is appended to ``<out stem>.trials.jsonl`` beside
  it; a rerun with the same method, keep, objective and samples reuses those trials and runs only
  the missing ones. The result is written to ``out`` as a plan file that :func:`load_plan` reads
  (``vtprune.apply(model, vtprune.load_plan("tuned.json"))``).

Example:
    >>> result = vtprune.tune(model, "pdrop", samples, keep=0.11, trials=8, out="pdrop.json")  # doctest: +SKIP
    >>> result.options  # doctest: +SKIP
    {'keep': 0.11, 'layers': [1, 3, 6]}
    >>> vtprune.apply(model, vtprune.load_plan("pdrop.json"))  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vtprune.config import (
    REGISTRY,
    MethodConfig,
    ModelInfo,
    check_bool,
    check_choice,
    check_fraction,
    check_int,
    config_from_name,
)
from vtprune.search import canonical, draw_settings

OBJECTIVES = ("kl", "hidden")
PLAN_FORMAT = 1  # version of the plan file written by ``tune``


@dataclass
class TuneResult:
    """What :func:`tune` found.

    ``options`` are the best feasible setting's options (``keep`` included), ``config`` the
    method config built from them, ``score`` its objective (lower is better), ``default_score`` the
    default setting's, ``measured_keep`` the best setting's measured layer-average keep,
    ``trials`` every trial record (reused and new), ``new_trials`` how many ran in this call.
    """

    method: str
    options: dict
    config: MethodConfig
    score: float
    default_score: float
    measured_keep: float
    trials: list[dict] = field(default_factory=list)
    new_trials: int = 0
    path: str | None = None


def load_plan(path) -> MethodConfig:
    """Read a plan file written by :func:`tune` (or by hand: ``{"method": ..., "options": {...}}``)
    into a config object for ``vtprune.apply``.

    Example:
        >>> import json, tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "plan.json")
        >>> _ = open(path, "w").write(json.dumps({"method": "pdrop", "options": {"keep": 0.25, "layers": [2, 6]}}))
        >>> load_plan(path)
        PyramidDrop(keep=0.25, layers=[2, 6], ratio=None)
    """
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or "method" not in data or not isinstance(data.get("options", {}), dict):
        raise ValueError(
            f"vtprune.load_plan: {path} is not a plan file (a JSON object with 'method' and 'options')"
        )
    return config_from_name(data["method"], **data.get("options", {}))


def tune(
    model,
    method: str,
    samples,
    *,
    keep: float,
    trials: int = 20,
    seed: int = 0,
    objective: str = "kl",
    space: dict | None = None,
    out=None,
    tolerance: float = 0.02,
    progress: bool = True,
) -> TuneResult:
    """Search ``method``'s options at a fixed ``keep`` for the pruned model closest to the unpruned one.

    Args:
        model: a model ``vtprune.apply`` accepts (no plan may be applied to it).
        method: a registered method name (``"pdrop"``, ``"mustdrop"``, ``"vflowopt"``, ...).
        samples: calibration inputs, a non-empty list of keyword dicts for ``model(**sample)``
            (processor outputs, left-padded: a row's answer position is its last column).
        keep: the target layer-average fraction of visual tokens, fixed during the search.
        trials: settings to try, the default setting included (at least 1).
        seed: seeds the order in which the space is explored.
        objective: ``"kl"`` (next-token KL divergence, default) or ``"hidden"`` (1 - cosine of
            the last hidden state at the answer position).
        space: option name -> list of candidate values; default: the method's own
            (``MethodConfig.tune_space``). ``keep`` may not be searched.
        out: path of the plan file to write (JSON); its trials go to ``<stem>.trials.jsonl``
            beside it and are reused by a rerun. ``None``: nothing is written, nothing resumed.
        tolerance: relative distance of the measured keep from ``keep`` a setting may have.
        progress: show a progress bar (tqdm).

    Returns:
        a :class:`TuneResult`; with ``out``, the plan file :func:`load_plan` reads.

    Example:
        >>> r = vtprune.tune(model, "fastv", samples, keep=0.25, trials=4, progress=False)  # doctest: +SKIP
        >>> vtprune.apply(model, r.config)  # doctest: +SKIP
    """
    from vtprune import api

    _check_args(method, samples, keep, trials, seed, objective, out, tolerance, progress)
    if api.handle_of(model) is not None:
        raise ValueError("vtprune.tune: the model already has a pruning plan; vtprune.remove(model) first")
    info = _model_info(model)
    cls = REGISTRY[method]
    space = dict(cls.tune_space(info, keep) if space is None else space)
    _check_space(method, cls, space)
    study = _study_key(method, keep, objective, samples)
    trials_path = None if out is None else Path(out).with_name(Path(out).stem + ".trials.jsonl")
    done = _read_trials(trials_path, study)
    settings = [{}] + draw_settings({k: list(v) for k, v in space.items()}, trials - 1, seed)
    todo = [s for s in settings if canonical(s) not in done]
    records = {canonical(s): done[canonical(s)] for s in settings if canonical(s) in done}
    if todo:
        references = [_forward(model, s, objective) for s in _bar(samples, progress, "tune: reference")]
        for setting in _bar(todo, progress, f"tune {method}"):
            record = _trial(model, method, setting, keep, samples, references, objective, tolerance)
            record["study"] = study
            records[canonical(setting)] = record
            if trials_path is not None:
                trials_path.parent.mkdir(parents=True, exist_ok=True)
                with trials_path.open("a") as fh:
                    fh.write(json.dumps(record) + "\n")
    ordered = [records[canonical(s)] for s in settings]
    slack = _slack(ordered[0], keep, tolerance)
    for r in ordered:  # judged here, not stored: the default's own miss sets the slack
        r["feasible"] = r["keep"] is not None and abs(r["keep"] - keep) <= slack
    best = min((r for r in ordered if r["feasible"]), key=lambda r: r["score"], default=None)
    if best is None:
        raise ValueError(
            f"vtprune.tune: no setting of {method} reached keep={keep} within {tolerance:.0%} "
            f"(measured: {[r['keep'] for r in ordered]}; errors: {sorted({r['error'] for r in ordered if r['error']})})"
        )
    options = {"keep": keep, **best["options"]}
    result = TuneResult(
        method=method,
        options=options,
        config=config_from_name(method, **options),
        score=best["score"],
        default_score=ordered[0]["score"],
        measured_keep=best["keep"],
        trials=ordered,
        new_trials=len(todo),
        path=None if out is None else str(out),
    )
    if out is not None:
        _write_plan(out, result, objective, seed, trials, space)
    return result


# -- one trial --------------------------------------------------------------------------------
def _trial(model, method, setting, keep, samples, references, objective, tolerance) -> dict:
    from vtprune import api

    record = {"options": setting, "score": math.inf, "keep": None, "error": None}
    try:
        cfg = config_from_name(method, keep=keep, **setting)
        api.apply(model, cfg)
    except (ValueError, NotImplementedError) as err:  # the method refuses this setting here
        record["error"] = str(err)
        return record
    try:
        scores, keeps = [], []
        for sample, ref in zip(samples, references):
            got = _forward(model, sample, objective)
            scores.append(_divergence(ref, got, objective))
            stats = api.stats(model)
            keeps.append(stats.keep_ratio if stats is not None else 1.0)
    except ValueError as err:  # options checked only against a request's own shapes
        record["error"] = str(err)
        return record
    finally:
        api.remove(model)
    record["score"] = float(torch.cat(scores).mean())
    record["keep"] = sum(keeps) / len(keeps)
    return record


def _slack(default: dict, keep: float, tolerance: float) -> float:
    """How far a setting's measured keep may be from ``keep``: ``tolerance * keep``, or the
    default setting's own distance when that is larger (a small image rounds every setting's
    counts; the method's default is the yardstick, not a bound no setting can meet)."""
    own = abs(default["keep"] - keep) if default["keep"] is not None else 0.0
    return max(tolerance * keep, own)


@torch.no_grad()
def _forward(model, sample: Mapping, objective: str) -> torch.Tensor:
    """Per row, the answer position's (the last column's: samples are left-padded)
    log-probabilities (``"kl"``) or last hidden state."""
    out = model(**sample, output_hidden_states=objective == "hidden", use_cache=False)
    if objective == "hidden":  # pruned rows are shorter: the answer position is the last one
        return out.hidden_states[-1][:, -1].float()
    return torch.log_softmax(out.logits[:, -1].float(), dim=-1)


def _divergence(ref: torch.Tensor, got: torch.Tensor, objective: str) -> torch.Tensor:
    """Per row: KL(reference || pruned) of next-token distributions, or 1 - cosine of hidden states."""
    if objective == "hidden":
        return 1 - torch.nn.functional.cosine_similarity(ref, got.to(ref.device), dim=-1)
    return (ref.exp() * (ref - got.to(ref.device))).sum(-1).clamp_min(0)


# -- bookkeeping ------------------------------------------------------------------------------
def _model_info(model) -> ModelInfo:
    from vtprune.api import _tower_depth
    from vtprune.integrations import adapter_for

    adapter = adapter_for(model)
    return ModelInfo(
        num_layers=adapter.num_layers, family=adapter.family, vision_layers=_tower_depth(adapter)
    )


def _study_key(method, keep, objective, samples) -> str:
    """One hash of what makes trials comparable: the method, target, objective and samples (the
    tolerance is not: feasibility is judged from the stored measured keep on every call)."""
    h = hashlib.sha1(canonical([method, keep, objective]).encode())
    for sample in samples:
        for name in sorted(sample):
            value = sample[name]
            if isinstance(value, torch.Tensor):
                h.update(name.encode())
                h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _read_trials(path: Path | None, study: str) -> dict[str, dict]:
    if path is None or not path.exists():
        return {}
    done = {}
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        record = json.loads(line)
        if record.get("study") != study:
            raise ValueError(
                f"vtprune.tune: {path} line {n} holds a trial of another search (other method, keep, "
                "objective or samples); give another 'out' or delete that file"
            )
        done[canonical(record["options"])] = record
    return done


def _write_plan(out, result: TuneResult, objective, seed, trials, space) -> None:
    data = {
        "format": PLAN_FORMAT,
        "method": result.method,
        "options": result.options,
        "tuned": {
            "objective": objective,
            "score": result.score,
            "default_score": result.default_score,
            "measured_keep": result.measured_keep,
            "trials": trials,
            "seed": seed,
            "space_size": {name: len(values) for name, values in space.items()},
        },
    }
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(data, indent=2) + "\n")


def _bar(items, progress: bool, desc: str):
    if not progress:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, leave=False)


# -- argument checks --------------------------------------------------------------------------
def _check_args(method, samples, keep, trials, seed, objective, out, tolerance, progress) -> None:
    if not isinstance(method, str) or method not in REGISTRY:
        raise ValueError(
            f"tune: option 'method'={method!r} is invalid; allowed: {', '.join(sorted(REGISTRY))}"
        )
    check_fraction("tune", "keep", keep)
    check_int("tune", "trials", trials, minimum=1)
    check_int("tune", "seed", seed)
    check_choice("tune", "objective", objective, OBJECTIVES)
    check_bool("tune", "progress", progress)
    check_fraction("tune", "tolerance", tolerance)
    if out is not None and not isinstance(out, (str, Path)):
        raise ValueError(f"tune: option 'out'={out!r} is invalid; allowed: a file path or None")
    ok = isinstance(samples, (list, tuple)) and len(samples) > 0
    ok = ok and all(isinstance(s, Mapping) and isinstance(s.get("input_ids"), torch.Tensor) for s in samples)
    if not ok:
        raise ValueError(
            "tune: option 'samples' is invalid; allowed: a non-empty list of model-input dicts "
            "(each with an 'input_ids' tensor)"
        )
    for i, sample in enumerate(samples):
        mask = sample.get("attention_mask")
        if mask is not None and not bool(mask[:, -1].all()):
            raise ValueError(
                f"tune: option 'samples'[{i}] is right-padded; allowed: left-padded rows (each row's "
                "answer position is its last column; processor.tokenizer.padding_side = 'left')"
            )


def _check_space(method: str, cls, space: dict) -> None:
    if not space:
        raise ValueError(f"tune: {method} declares no search space; pass space={{option: [values, ...]}}")
    fields = {f.name for f in dataclasses.fields(cls) if f.init} - {"keep"}
    for name, values in space.items():
        if name not in fields:
            raise ValueError(
                f"tune: option 'space' names {name!r}, not an option of {method} that may be searched; "
                f"allowed: {', '.join(sorted(fields))}"
            )
        if not isinstance(values, (list, tuple)) or not values:
            raise ValueError(
                f"tune: option 'space'[{name!r}]={values!r} is invalid; allowed: a non-empty list of values"
            )
