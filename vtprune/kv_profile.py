"""Profiling PrefixKV's per-layer KV budgets offline on calibration samples.

For each calibration prompt the unpruned model runs once; every layer's importance per cached
position (attention received, summed over queries, mean over heads, computed beside SDPA) is
kept. For each global budget ``keep`` the official profiler's rule
(:func:`vtprune.kv_budget.forget_counts`: one cumulative-importance level for all layers,
bisected to the budget, rescaled) gives each layer's evictions in that prompt; the retention
``1 - forget_l / n`` is averaged over prompts. The result is saved as JSON and read by
``apply(model, "prefixkv", keep=..., profile=...)``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from vtprune.kv_budget import forget_counts

DEFAULT_BUDGETS = tuple(round(0.05 * i, 2) for i in range(1, 20))  # 0.05 .. 0.95


@dataclass
class PrefixKVProfile:
    """Per-layer KV retention for a grid of global budgets, from :func:`profile_prefixkv`.

    ``retentions[j][l]`` is the fraction of a prompt's positions layer ``l`` keeps at global
    budget ``budgets[j]`` (the official configs store ``1 -`` this, the "forget ratio").

    Example:
        >>> p = PrefixKVProfile(budgets=[0.2, 0.4], retentions=[[0.1, 0.3], [0.3, 0.5]])
        >>> p.retention(0.3, num_layers=2)  # between two profiled budgets: interpolated
        [0.2, 0.4]
        >>> p.retention(1.0, num_layers=2)
        [1.0, 1.0]
    """

    budgets: list[float]
    retentions: list[list[float]]
    sink: int = 4
    samples: int = 0
    model: str = ""
    spread: list[list[float]] = field(default_factory=list)  # std of the retention over samples

    def save(self, path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path) -> PrefixKVProfile:
        try:
            data = json.loads(Path(path).read_text())
            return cls(**data)
        except (OSError, json.JSONDecodeError, TypeError) as err:
            raise ValueError(f"prefixkv: cannot read a profile from {path!r}: {err}") from err

    def retention(self, keep: float, num_layers: int) -> list[float]:
        """Per-layer retention at global budget ``keep`` (linear between profiled budgets)."""
        if self.retentions and len(self.retentions[0]) != num_layers:
            raise ValueError(
                f"prefixkv: the profile has {len(self.retentions[0])} layers, the model has {num_layers}"
            )
        if keep >= 1:
            return [1.0] * num_layers
        pairs = sorted(zip(self.budgets, self.retentions))
        for (b0, r0), (b1, r1) in zip(pairs, pairs[1:] + [(1.0, [1.0] * num_layers)]):
            if abs(keep - b0) < 1e-9:
                return list(r0)
            if b0 < keep < b1:
                w = (keep - b0) / (b1 - b0)
                return [round(x + w * (y - x), 12) for x, y in zip(r0, r1)]
        raise ValueError(
            f"prefixkv: option 'keep'={keep!r} is outside the profiled budgets; allowed: a number in "
            f"[{min(self.budgets)}, 1] (profile again with budgets that include it)"
        )


def profile_prefixkv(
    model, samples, budgets=DEFAULT_BUDGETS, sink: int = 4, name: str = ""
) -> PrefixKVProfile:
    """Measure each layer's attention concentration on ``samples`` and derive per-layer budgets.

    Args:
        model: an unpruned supported model (full-attention decoder).
        samples: an iterable of processor outputs (dicts of tensors); batched rows count as
            separate prompts (padding excluded).
        budgets: the global budgets (fractions of KV positions kept) to derive.
        sink: first tokens never evicted (the last token never is either), as in ``apply``.
        name: a label stored in the profile (e.g. the checkpoint name).

    Example:
        >>> prof = vtprune.profile_prefixkv(model, [processor(images=img, text=p, return_tensors="pt")])  # doctest: +SKIP
        >>> prof.save("prefixkv.json"); vtprune.apply(model, "prefixkv", keep=0.3, profile="prefixkv.json")  # doctest: +SKIP
    """
    import vtprune
    from vtprune.api import handle_of
    from vtprune.methods.prefixkv import PrefixKV

    if handle_of(model) is not None:
        raise ValueError(
            "vtprune.profile_prefixkv needs the unpruned model: call vtprune.remove(model) first"
        )
    budgets = [float(b) for b in budgets]
    for b in budgets:
        if not 0 < b < 1:
            raise ValueError(f"profile_prefixkv: budget {b!r} is invalid; allowed: numbers in (0, 1)")
    handle = vtprune.apply(model, PrefixKV(keep=1.0, sink=sink))
    (stage,) = handle.stages
    stage.record = []
    try:
        for sample in tqdm(list(samples), desc="profile prefixkv", leave=False):
            with torch.no_grad():
                model(**sample, use_cache=True)
    finally:
        vtprune.remove(model)
    if not stage.record:
        raise ValueError("profile_prefixkv: no samples were given")
    per_budget = []
    for b in budgets:
        rows = []
        for layers in stage.record:
            forget = forget_counts(layers, b, sink + 1)
            rows.append([1.0 - f / max(s.numel(), 1) for f, s in zip(forget, layers)])
        per_budget.append(torch.tensor(rows, dtype=torch.float64))
    return PrefixKVProfile(
        budgets=budgets,
        retentions=[r.mean(0).tolist() for r in per_budget],
        sink=sink,
        samples=len(stage.record),
        model=name,
        spread=[r.std(0, unbiased=False).tolist() for r in per_budget],
    )
