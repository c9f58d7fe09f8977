"""Per-sample result files: append as batches finish, resume after an interruption, merge shards.

Layout under the output folder: a running job appends one JSON record per sample to
``<task>/<plan slug>.jsonl`` (with several processes each rank to its own
``<task>/<plan slug>.rank<k>.jsonl``). When a task is finished, rank 0 merges everything into
``<task>/<plan slug>.jsonl.gz`` (gzip: a fidelity run holds tens of thousands of records, and the
merged files are committed under ``results/``) and removes the plain ``.jsonl``. Resuming reads
the ``.jsonl.gz``, the plain file and the rank's shard together, so a finished file, an
interrupted one and an output folder of the older plain-only layout all resume.

A run that is killed mid-write leaves at most one truncated last line (possibly cut inside a
UTF-8 character), which the reader skips and the next append cuts off, so that sample is redone;
the same holds for a ``.jsonl.gz`` cut short (its readable part is read, its torn last line
skipped). Any other unreadable line is an error naming the file and line.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import zlib
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


def merged_path(out: str | Path, task: str, plan: str) -> Path:
    """Where the merged, gzip-compressed records of a finished ``task`` x ``plan`` live.

    Example:
        >>> merged_path("out", "pope", "fastv:keep=0.5").as_posix()
        'out/pope/fastv_keep=0.5.jsonl.gz'
    """
    return Path(out) / task / f"{plan_slug(plan)}.jsonl.gz"


def read_records(path: str | Path) -> dict[str, dict]:
    """Records of a JSONL file (gzip-compressed if its name ends in ``.gz``) keyed by ``sample_id``
    (empty if absent).

    The last line may be torn by an interruption (cut anywhere, even inside a multi-byte UTF-8
    character): it is skipped, so that sample is redone. Any other line that is not a JSON
    record raises ``ValueError`` naming the file and the line.

    Example:
        >>> read_records("/nonexistent.jsonl")
        {}
    """
    path = Path(path)
    if not path.is_file():
        return {}
    data = _gunzip(path) if path.suffix == ".gz" else path.read_bytes()
    lines = data.split(b"\n")
    while lines and not lines[-1].strip():
        lines.pop()
    out: dict[str, dict] = {}
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        rec = _parse_line(raw)
        if rec is None and number == len(lines):
            continue  # a line cut by an interruption: that sample is simply redone
        if rec is None:
            raise ValueError(
                f"{path}, line {number}: not a JSON record with a sample_id ({raw[:80]!r}); "
                "only the last line may be torn: delete that line to redo its sample"
            )
        out[str(rec["sample_id"])] = rec
    return out


def _gunzip(path: Path) -> bytes:
    """The decompressed bytes of a gzip file, as far as they go: a file cut short (a copy or a write
    that was interrupted) gives its readable part, whose torn last line the reader then skips. A
    corrupt stream is an error naming the file."""
    raw, out = path.read_bytes(), []
    while raw:  # one gzip member after another (``cat a.gz b.gz`` is a valid gzip file)
        d = zlib.decompressobj(wbits=31)
        try:
            out.append(d.decompress(raw))
        except zlib.error as err:
            raise ValueError(
                f"{path}: not a readable gzip file ({err}); delete it to redo its samples"
            ) from err
        if not d.eof:
            break  # cut short: keep what was decompressed
        raw = d.unused_data
    return b"".join(out)


def _parse_line(raw: bytes) -> dict | None:
    """The record on one line, or ``None`` if it is not valid UTF-8 JSON of a dict with a sample_id."""
    try:
        rec = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return rec if isinstance(rec, dict) and "sample_id" in rec else None


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
    if path.suffix == ".gz":
        raise ValueError(f"{path}: records are appended to a plain .jsonl; .jsonl.gz files are written whole")
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    with open(path, "a", encoding="utf-8") as f:
        _repair_tail(f, path)
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _repair_tail(f, path: Path) -> None:
    """End a torn last line before appending: keep it if it is a whole record, else cut it off.

    A torn record glued onto the next one, or left in the middle of the file, would be
    unreadable; the sample it held is not in the file, so it is redone.
    """
    size = path.stat().st_size
    if not size:
        return
    with open(path, "rb") as r:
        r.seek(size - 1)
        if r.read(1) == b"\n":
            return
        start = _last_line_start(r, size)
        r.seek(start)
        tail = r.read()
    f.flush()
    if _parse_line(tail) is not None:
        f.write("\n")  # a whole record that only lacks its newline
    else:
        f.truncate(start)


def _last_line_start(r, size: int, chunk: int = 1 << 16) -> int:
    """Offset just after the last newline of the binary file ``r`` (0 if it has none)."""
    end = size
    while end > 0:
        start = max(0, end - chunk)
        r.seek(start)
        i = r.read(end - start).rfind(b"\n")
        if i >= 0:
            return start + i + 1
        end = start
    return 0


def write_records(path: str | Path, records: Sequence[dict]) -> None:
    """Replace ``path`` with ``records`` atomically (write a temporary file, then rename); gzip-compressed
    if the name ends in ``.gz``, with no time stamp, so the same records give the same bytes.

    Example:
        >>> import tempfile
        >>> p = Path(tempfile.mkdtemp()) / "x.jsonl.gz"
        >>> write_records(p, [{"sample_id": "a"}]); list(read_records(p))
        ['a']
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    if path.suffix == ".gz":
        data = gzip.compress(data, compresslevel=9, mtime=0)
    tmp.write_bytes(data)
    os.replace(tmp, path)


def finished(out: str | Path, task: str, plan: str, rank: int | None) -> dict[str, dict]:
    """Records already written for ``task`` x ``plan``: the merged ``.jsonl.gz``, the plain ``.jsonl``
    (a run in progress, or an older plain-only output folder) and this rank's shard.

    Example:
        >>> finished("/nonexistent", "pope", "baseline", rank=None)
        {}
    """
    done = read_records(merged_path(out, task, plan))
    done.update(read_records(records_path(out, task, plan)))
    if rank is not None:
        done.update(read_records(records_path(out, task, plan, rank)))
    return done


def merge_shards(out: str | Path, task: str, plan: str, world_size: int, order: Sequence[str]) -> list[dict]:
    """Merge the plain and rank files into ``<task>/<plan>.jsonl.gz``; return the records of ``order``
    (sample ids).

    Nothing finished is ever dropped: the merged file keeps every record it, the plain file or a
    rank file holds, those of ``order`` first in that order, then the others (samples beyond a
    smaller ``--limit``, say) in their earlier order. The plain file is removed once its records
    are in the merged one (rank files stay, as the shards of the run). Merging again is safe.

    Example:
        >>> merge_shards("/tmp/none", "pope", "baseline", 2, [])
        []
    """
    plain = records_path(out, task, plan)
    merged = read_records(merged_path(out, task, plan))
    merged.update(read_records(plain))
    for rank in range(world_size):
        merged.update(read_records(records_path(out, task, plan, rank)))
    wanted = set(order)
    records = [merged[sid] for sid in order if sid in merged]
    others = [rec for sid, rec in merged.items() if sid not in wanted]
    if merged:
        write_records(merged_path(out, task, plan), records + others)
        plain.unlink(missing_ok=True)  # only after the merged file holds its records
    return records
