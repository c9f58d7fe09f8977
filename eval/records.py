"""Per-sample result files: append as batches finish, resume after an interruption, merge shards.

Layout under the output folder: ``<task>/<plan slug>.jsonl`` holds one JSON record per sample
(the merged result); with several processes each rank appends to its own
``<task>/<plan slug>.rank<k>.jsonl`` and rank 0 merges them. A run that is killed mid-write
leaves at most one truncated last line, which the reader skips, so that sample is redone.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path


def plan_slug(plan: str) -> str:
    """A file-name-safe form of a plan string.

    Example:
        >>> plan_slug("pdrop:layers=8+16+24,ratio=0.5")
        'pdrop_layers=8+16+24_ratio=0.5'
    """
    return re.sub(r"[^\w.=+-]", "_", plan)


def records_path(out: str | Path, task: str, plan: str, rank: int | None = None) -> Path:
    """Where the records of ``task`` x ``plan`` live (``rank``: that process's shard file).

    Example:
        >>> records_path("out", "pope", "fastv:keep=0.5", rank=1).as_posix()
        'out/pope/fastv_keep=0.5.rank1.jsonl'
    """
    suffix = "" if rank is None else f".rank{rank}"
    return Path(out) / task / f"{plan_slug(plan)}{suffix}.jsonl"


def read_records(path: str | Path) -> dict[str, dict]:
    """Records of a JSONL file keyed by ``sample_id`` (empty if absent; a torn last line is skipped).

    Example:
        >>> read_records("/nonexistent.jsonl")
        {}
    """
    path = Path(path)
    if not path.is_file():
        return {}
    out: dict[str, dict] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by an interruption: that sample is simply redone
        if isinstance(rec, dict) and "sample_id" in rec:
            out[str(rec["sample_id"])] = rec
    return out


def append_records(path: str | Path, records: Iterable[dict]) -> None:
    """Append ``records`` as JSON lines and flush them to disk (one call per finished batch).

    Example:
        >>> import tempfile
        >>> p = Path(tempfile.mkdtemp()) / "t" / "baseline.jsonl"
        >>> append_records(p, [{"sample_id": "1", "prediction": "yes"}])
        >>> read_records(p)["1"]["prediction"]
        'yes'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    with open(path, "a", encoding="utf-8") as f:
        _repair_tail(f, path)
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _repair_tail(f, path: Path) -> None:
    # A torn last line (no newline) would glue onto the next record; end it first.
    size = path.stat().st_size
    if size:
        with open(path, "rb") as r:
            r.seek(size - 1)
            if r.read(1) != b"\n":
                f.write("\n")


def write_records(path: str | Path, records: Sequence[dict]) -> None:
    """Replace ``path`` with ``records`` atomically (write a temporary file, then rename).

    Example:
        >>> import tempfile
        >>> p = Path(tempfile.mkdtemp()) / "x.jsonl"
        >>> write_records(p, [{"sample_id": "a"}]); list(read_records(p))
        ['a']
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    os.replace(tmp, path)


def finished(out: str | Path, task: str, plan: str, rank: int | None) -> dict[str, dict]:
    """Records already written for ``task`` x ``plan``: the merged file plus this rank's shard.

    Example:
        >>> finished("/nonexistent", "pope", "baseline", rank=None)
        {}
    """
    done = read_records(records_path(out, task, plan))
    if rank is not None:
        done.update(read_records(records_path(out, task, plan, rank)))
    return done


def merge_shards(out: str | Path, task: str, plan: str, world_size: int, order: Sequence[str]) -> list[dict]:
    """Merge the rank files into ``<task>/<plan>.jsonl`` in ``order`` (sample ids); return the records.

    Samples already in the merged file are kept, so merging again after a resumed run is safe.

    Example:
        >>> merge_shards("/tmp/none", "pope", "baseline", 2, [])
        []
    """
    merged = read_records(records_path(out, task, plan))
    for rank in range(world_size):
        merged.update(read_records(records_path(out, task, plan, rank)))
    records = [merged[sid] for sid in order if sid in merged]
    if records or merged:
        write_records(records_path(out, task, plan), records)
    return records
