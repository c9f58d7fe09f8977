"""Plans: a plan string (``"fastv:layer=2,keep=0.25"``, ``"baseline"``) read, checked and put in force.

One grammar for every tool of the harness and the speed benchmarks: ``name:key=value,key=value`` with
``+`` between the items of a list value (``layers=8+16+24``), numbers and ``true``/``false`` cast.
"""

from __future__ import annotations

import vtprune
from vtprune.config import config_from_name


def parse_plan(text: str):
    """``"pdrop:layers=8+16+24,ratio=0.5"`` -> ``("pdrop", {"layers": [8, 16, 24], "ratio": 0.5})``.

    Example:
        >>> parse_plan("fastv:layer=2,keep=0.25")
        ('fastv', {'layer': 2, 'keep': 0.25})
    """
    name, _, rest = text.partition(":")
    opts = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        opts[key] = _value(value)
    return name, opts


def _value(v: str):
    if "+" in v:
        return [_value(x) for x in v.split("+")]
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(v.lower(), v)


def plan_config(plan: str):
    """The method config ``plan`` stands for (``None`` for ``"baseline"``), built as ``vtprune.apply`` builds it.

    ``vtprune.config.config_from_name`` runs every check the method's config makes on its
    options, so a bad plan fails here, before any sample is evaluated; the error names the plan.

    Example:
        >>> plan_config("random:keep=0.5,seed=3").seed
        3
        >>> plan_config("uniform:keep=2")
        Traceback (most recent call last):
        ...
        ValueError: plan 'uniform:keep=2': uniform: option 'keep'=2 is invalid; allowed: a number in (0, 1]
    """
    if plan == "baseline":
        return None
    name, opts = parse_plan(plan)
    try:
        return config_from_name(name, **opts)
    except (ValueError, TypeError) as err:
        raise ValueError(f"plan {plan!r}: {err}") from err


def apply_plan(model, plan: str, timing: bool = False) -> None:
    """Put ``plan`` in force: ``"baseline"`` removes any plan, else its config (:func:`plan_config`) is applied
    (``timing``: measure the method's overhead into ``vtprune.stats(model).overhead_s``).

    Example:
        >>> apply_plan(model, "pdrop:layers=8+16+24,ratio=0.5")  # doctest: +SKIP
        >>> apply_plan(model, "baseline")  # doctest: +SKIP
    """
    config = plan_config(plan)
    if config is None:
        vtprune.remove(model)
    else:
        vtprune.apply(model, config, timing=timing)
