"""The output folder of a `--ray` run: one shard file per chunk of work, written atomically.

Exactly once, by construction: the driver cuts the pending work into chunks and names each
chunk's shard after its content (`shard_name`: a hash of the rows' keys). A worker writes the
shard to a temporary name and renames it into place, so a shard is either whole or absent; a
chunk that Ray redoes (its worker died, before or after the rename) writes the same name again
and replaces it. A rerun reads the keys of every shard (`settle`) and skips them, so its chunks
hold only work no shard has, and never reuse an old shard's name.

`settle` also removes any row whose key an earlier shard already holds (rewriting that shard
atomically). Nothing in a normal run makes such a row; it covers a worker of an interrupted
driver on a shared cluster that finished a chunk after a rerun had planned the same work.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from collections.abc import Iterator

from vlm.errors import VLMError

from .inputs import row_key
from .writers import JsonlWriter, iter_rows

SHARD_FORMATS = ("jsonl", "parquet")
# Parquet columns that hold numbers; every other field is a string (absent: null).
FLOAT_FIELDS = ("itc", "itm")


def shard_name(keys: list[tuple]) -> str:
    """The shard name of a chunk of work: the same rows always get the same name."""
    digest = hashlib.sha1(json.dumps(keys, ensure_ascii=False).encode("utf-8")).hexdigest()
    return f"part-{digest[:24]}"


def prepare_folder(folder: str) -> str:
    """Create the output folder; returns the path whose lock (`<path>.lock`) a run holds."""
    if os.path.isfile(folder):
        raise VLMError(f"{folder}: is a file; with --ray, --out names a folder of shards")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise VLMError(f"{folder}: cannot create the output folder ({e.strerror or e})") from None
    return os.path.join(folder, "run")


def clean_folder(folder: str, overwrite: bool) -> None:
    """Drop temporary files left by killed workers (their chunks are redone), and for
    --overwrite every shard."""
    stale = glob.glob(os.path.join(glob.escape(folder), ".part-*.tmp"))
    if overwrite:
        stale += shard_paths(folder)
    for path in stale:
        os.unlink(path)


def shard_paths(folder: str) -> list[str]:
    """The finished shards in `folder`, sorted by name."""
    pattern = os.path.join(glob.escape(folder), "part-*")
    return sorted(p for p in glob.glob(pattern) if p.endswith(tuple("." + f for f in SHARD_FORMATS)))


def write_shard(folder: str, name: str, rows: list[dict], fmt: str, fields: list[str]) -> str:
    """Write `rows` as shard `name` (temporary file, then rename); returns its path."""
    final = os.path.join(folder, f"{name}.{fmt}")
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.tmp")
    if os.path.exists(tmp):
        os.unlink(tmp)  # a dead process with this pid left it
    if fmt == "jsonl":
        writer = JsonlWriter(tmp)  # the one-machine writer: the same bytes per row, fsync'ed
        try:
            writer.write(rows)
        finally:
            writer.close()
    else:
        import pyarrow.parquet as pq

        pq.write_table(rows_table(rows, fields), tmp)
    os.replace(tmp, final)
    return final


def rows_table(rows: list[dict], fields: list[str]):
    """`rows` as an Arrow table with one column per field (null where a row lacks it)."""
    import pyarrow as pa

    names = fields + sorted({k for r in rows for k in r} - set(fields))
    return pa.table({n: pa.array([r.get(n) for r in rows], pa.float64() if n in FLOAT_FIELDS else pa.string())
                     for n in names})


def iter_shard(path: str) -> Iterator[dict]:
    """The rows of one shard, as the one-machine writer would have written them."""
    if path.endswith(".jsonl"):
        yield from iter_rows(path, "jsonl")
        return
    import pyarrow.parquet as pq

    for row in pq.read_table(path).to_pylist():
        yield {k: v for k, v in row.items() if v is not None}


def iter_output(folder: str) -> Iterator[dict]:
    """Every row of every shard in `folder`."""
    for path in shard_paths(folder):
        yield from iter_shard(path)


def settle(folder: str, fields: list[str]) -> tuple[set[tuple], int]:
    """(`row_key`s of every row in the shards, rows removed as duplicates of an earlier shard's)."""
    done: set[tuple] = set()
    removed = 0
    for path in shard_paths(folder):
        rows = list(iter_shard(path))
        keep = []
        for row in rows:
            key = row_key(row)
            if key not in done:
                done.add(key)
                keep.append(row)
        if len(keep) < len(rows):
            removed += len(rows) - len(keep)
            name, fmt = os.path.basename(path).rsplit(".", 1)
            if keep:
                write_shard(folder, name, keep, fmt, fields)
            else:
                os.unlink(path)
    return done, removed
