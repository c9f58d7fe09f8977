"""Search-space building blocks for ``vtprune.tune`` (pure Python, no torch).

Methods declare their default spaces (``MethodConfig.tune_space``) with these helpers: candidate
decoder layers spread over the depth, increasing layer lists built from them, and the seeded
draw of distinct candidate settings from a space.
"""

from __future__ import annotations

import itertools
import json
import math
import random

#: fractions of the decoder depth the default layer candidates sit at
LAYER_FRACTIONS = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 3 / 8, 1 / 2, 5 / 8, 3 / 4, 7 / 8)


def layer_candidates(num_layers: int, *, first: int = 1, fractions=LAYER_FRACTIONS) -> list[int]:
    """Distinct decoder layers at ``fractions`` of the depth, within ``first..num_layers - 1``.

    Example:
        >>> layer_candidates(12)
        [1, 2, 3, 5, 6, 8, 9, 11]
        >>> layer_candidates(32)[:4]
        [1, 2, 4, 8]
    """
    out = {min(num_layers - 1, max(first, int(num_layers * f + 0.5))) for f in fractions}
    return sorted(x for x in out if first <= x <= num_layers - 1)


def increasing_lists(candidates: list[int], sizes, *, first_below: float | None = None) -> list[list[int]]:
    """Every strictly increasing list of ``sizes`` elements drawn from ``candidates``; with
    ``first_below``, only lists whose first element is below it (an earlier layer keeps
    everything, so a late first boundary cannot reach a small ``keep``).

    Example:
        >>> increasing_lists([1, 4, 8], [2])
        [[1, 4], [1, 8], [4, 8]]
        >>> increasing_lists([1, 4, 8], [2, 3], first_below=2)
        [[1, 4], [1, 8], [1, 4, 8]]
    """
    out = []
    for size in sizes:
        for combo in itertools.combinations(sorted(set(candidates)), size):
            if first_below is None or combo[0] < first_below:
                out.append(list(combo))
    return out


def space_size(space: dict[str, list]) -> int:
    """How many settings a space holds (the product of its choice counts).

    Example:
        >>> space_size({"layer": [1, 2, 3], "score": ["last", "mean"]})
        6
    """
    return math.prod(len(v) for v in space.values())


def canonical(options: dict) -> str:
    """A setting as one stable string (sorted keys; tuples read as lists), to compare settings.

    Example:
        >>> canonical({"b": (1, 2), "a": 0.5})
        '{"a": 0.5, "b": [1, 2]}'
    """
    return json.dumps(options, sort_keys=True)


def draw_settings(space: dict[str, list], n: int, seed: int) -> list[dict]:
    """``n`` distinct settings of ``space`` in a seeded random order (all of them if it holds
    fewer). Small spaces are shuffled whole (a random grid search without repeats); large ones
    are sampled one option at a time, repeats skipped.

    Example:
        >>> space = {"layer": [1, 2, 3], "score": ["last", "mean"]}
        >>> draw_settings(space, 2, seed=0) == draw_settings(space, 2, seed=0)
        True
        >>> len(draw_settings(space, 10, seed=0))
        6
    """
    names = sorted(space)
    rng = random.Random(f"vtprune.tune:{seed}")
    total = space_size(space)
    if n <= 0 or total == 0:
        return []
    if total <= 100_000:
        picks = rng.sample(range(total), min(n, total))
        out = []
        for index in picks:
            setting = {}
            for name in reversed(names):  # mixed-radix digits of the grid index
                index, digit = divmod(index, len(space[name]))
                setting[name] = space[name][digit]
            out.append({name: setting[name] for name in names})
        return out
    seen, out = set(), []
    while len(out) < n and len(seen) < 50 * n:
        setting = {name: rng.choice(space[name]) for name in names}
        key = canonical(setting)
        if key not in seen:
            seen.add(key)
            out.append(setting)
    return out
