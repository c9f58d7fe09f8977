"""The benchmark reader registry: ``load_benchmark(name, data_dir)`` -> ``list[Sample]``.

Every reader takes the local folder holding the benchmark's raw files (layouts in
shared/design/EVAL.md) plus keyword options, and records the exact prompt in each sample.
``load_from_hub`` (in :mod:`.hub`) reads the ``lmms-lab/*`` datasets instead when the optional
``datasets`` package is installed and the machine is online.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .hub import HubUnavailableError, load_from_hub
from .readers_choice import read_mmbench, read_scienceqa, read_seedbench
from .readers_vqa import read_gqa, read_textvqa
from .readers_yesno import read_mme, read_pope
from .samples import BenchmarkFileError, Sample, apply_limit

__all__ = [
    "READERS",
    "BenchmarkFileError",
    "HubUnavailableError",
    "Sample",
    "benchmark_names",
    "load_benchmark",
    "load_from_hub",
]

READERS: dict[str, Callable[..., list[Sample]]] = {
    "pope": read_pope,
    "mme": read_mme,
    "gqa": read_gqa,
    "textvqa": read_textvqa,
    "scienceqa": read_scienceqa,
    "mmbench": read_mmbench,
    "seedbench": read_seedbench,
}


def benchmark_names() -> list[str]:
    """The benchmarks that can be read, in registry order.

    Example:
        >>> benchmark_names()[:2]
        ['pope', 'mme']
    """
    return list(READERS)


def load_benchmark(name: str, data_dir: str | Path, limit: int | None = None, **options) -> list[Sample]:
    """Read benchmark ``name`` from ``data_dir``; ``options`` go to its reader.

    ``limit`` keeps the first ``limit`` items, where questions scored together (MME's two
    questions on one image, an MMBench question and its circular copies) count as one item and
    are kept whole, so a limited run still scores acc+ and circular accuracy correctly.

    Example:
        >>> samples = load_benchmark("pope", "data/pope", limit=10, splits=("random",))  # doctest: +SKIP
        >>> len(samples)  # doctest: +SKIP
        10
    """
    reader = READERS.get(name)
    if reader is None:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(READERS)}")
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise BenchmarkFileError(data_dir, f"data folder for {name!r} not found")
    return apply_limit(reader(data_dir, **options), limit)
