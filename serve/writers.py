"""Crash-safe output for `vlm caption`: JSONL, CSV, or a caption `.txt` beside each image.

Rows are appended and flushed (and fsync'ed) once per batch. A process killed mid-write can
leave half a record at the end of the file; readers ignore it and a writer cuts it off before
appending, so after any number of kills every image has exactly one complete row.

Multi-process runs write one JSONL part file per process (`OUT.part<rank>.jsonl`); the main
process merges them into `OUT` at the end, skipping rows already there, so a kill during the
merge is also harmless.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import glob
import io
import json
import os
from collections.abc import Iterable, Iterator

from vlm.errors import VLMError

from .inputs import row_key

FORMATS = ("jsonl", "csv", "txt")
# "path" is last so files written before it existed keep their column order.
CSV_FIELDS = ["image", "prompt", "question", "caption", "answer", "error", "path", "warning"]
_CHUNK = 1 << 20


def complete_length(path: str, quoted: bool = False) -> int:
    """Bytes of `path` up to the end of its last complete record (a newline outside quotes).

    JSON lines never hold a raw newline, so the last newline ends the last complete line. CSV
    fields may (quoted), so there a newline counts only after an even number of `"` characters:
    doubled quotes inside a field keep the parity right.
    """
    end, quotes, offset = 0, 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            if not quoted:
                last = chunk.rfind(b"\n")
                if last >= 0:
                    end = offset + last + 1
            else:
                for i, byte in enumerate(chunk):
                    if byte == 0x22:  # "
                        quotes += 1
                    elif byte == 0x0A and quotes % 2 == 0:
                        end = offset + i + 1
            offset += len(chunk)
    return end


def iter_rows(path: str, fmt: str = "jsonl") -> Iterator[dict]:
    """The complete rows of an output file (a half-written last record is ignored)."""
    if not os.path.isfile(path):
        return
    length = complete_length(path, quoted=fmt == "csv")
    # Streamed, and stopped at the end of the last complete record.
    with open(path, "rb") as raw:
        limited = io.BufferedReader(_Limited(raw, length))
        yield from _parse(io.TextIOWrapper(limited, encoding="utf-8", errors="replace", newline=""), fmt)


class _Limited(io.RawIOBase):
    """A raw reader that stops after `limit` bytes (the complete-record prefix)."""

    def __init__(self, raw, limit: int):
        self.raw, self.left = raw, limit

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self.left)
        data = self.raw.read(n)
        buffer[: len(data)] = data
        self.left -= len(data)
        return len(data)


def _parse(text, fmt: str) -> Iterator[dict]:
    if fmt == "csv":
        for row in csv.DictReader(text):
            yield {k: v for k, v in row.items() if k and v}
        return
    for line in text:
        line = line.strip()
        if not line:
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # not ours (or damaged): it names no image we can trust
        if isinstance(row, dict) and "image" in row:
            yield row


def read_done(paths: Iterable[str], fmt: str = "jsonl") -> set[tuple]:
    """Keys (`row_key`) of every complete row in `paths` (missing files are skipped)."""
    done: set[tuple] = set()
    for path in paths:
        done.update(row_key(row) for row in iter_rows(path, "csv" if fmt == "csv" and not _is_part(path) else "jsonl"))
    return done


def _is_part(path: str) -> bool:
    return path.endswith(".jsonl") and ".part" in os.path.basename(path)


def part_path(out: str, rank: int) -> str:
    """Where process `rank` of a multi-process run writes its rows before the merge."""
    return f"{out}.part{rank}.jsonl"


def part_paths(out: str) -> list[str]:
    """Part files left by this or an earlier (possibly killed) multi-process run."""
    return sorted(glob.glob(glob.escape(out) + ".part*.jsonl"))


def check_folder(path: str) -> None:
    """`VLMError` unless `path` can be an output file: its folder exists and it is not a folder."""
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise VLMError(f"{path}: folder {parent} does not exist")
    if os.path.isdir(path):
        raise VLMError(f"{path}: is a folder; --out must be a file")


def _truncate_partial(path: str, quoted: bool) -> None:
    if os.path.isfile(path):
        length = complete_length(path, quoted)
        if length != os.path.getsize(path):
            os.truncate(path, length)


class JsonlWriter:
    """Appends JSON lines (after cutting off a half-written last one); each `write` is fsync'ed.

    A file that cannot be written (read-only folder, full disk) is a `VLMError` naming it."""

    def __init__(self, path: str):
        self.path = path
        check_folder(path)
        with _writing(path):
            _truncate_partial(path, quoted=False)
            self.file = open(path, "a", encoding="utf-8", newline="")  # noqa: SIM115 -- open for the run

    def write(self, rows: list[dict]) -> list[dict]:
        if rows:
            # One write call per batch: either the whole batch lands or a tail is cut on resume.
            with _writing(self.path):
                self.file.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
                _sync(self.file)
        return rows

    def close(self) -> None:
        try:
            self.file.close()
        except OSError:
            pass  # the failed write already said why; closing flushes the same bytes again


@contextlib.contextmanager
def _writing(path: str):
    """OS errors while opening or writing `path` as one line naming it (read-only, full disk...)."""
    try:
        yield
    except OSError as e:
        raise VLMError(f"{path}: cannot write the output ({e.strerror or e})") from None


class CsvWriter(JsonlWriter):
    """Appends CSV records (header written once) with the columns `fields` (`CSV_FIELDS`: caption rows).

    Appending to an existing file keeps that file's header (columns it lacks are left out), so
    resuming never shifts columns under an older header.
    """

    def __init__(self, path: str, fields: list[str] = CSV_FIELDS):
        self.path = path
        check_folder(path)
        with _writing(path):
            _truncate_partial(path, quoted=True)
            fields = _csv_header(path) or fields
            self.file = open(path, "a", encoding="utf-8", newline="")  # noqa: SIM115 -- open for the run
            self.csv = csv.DictWriter(self.file, fieldnames=fields, lineterminator="\n", extrasaction="ignore")
            if self.file.tell() == 0:
                self.csv.writeheader()
                _sync(self.file)

    def write(self, rows: list[dict]) -> list[dict]:
        if rows:
            with _writing(self.path):
                self.csv.writerows(rows)
                _sync(self.file)
        return rows


def _csv_header(path: str) -> list[str] | None:
    """The column names of an existing, non-empty CSV file (None when there is none yet)."""
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        return None
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        return next(csv.reader(f), None) or None


class TxtWriter:
    """Writes each caption to a `.txt` beside its image (the layout diffusion trainers read).

    An existing caption file is never replaced unless `overwrite`; that image gets an error row
    instead. Rows (captions and errors) also go to `log` when one is given (`--out`).
    """

    def __init__(self, log: JsonlWriter | None = None, overwrite: bool = False):
        self.log, self.overwrite = log, overwrite

    @staticmethod
    def caption_path(image_path: str) -> str:
        return os.path.splitext(image_path)[0] + ".txt"

    def exists(self, image_path: str) -> bool:
        return not self.overwrite and os.path.exists(self.caption_path(image_path))

    def write(self, rows: list[dict], paths: list[str] | None = None) -> list[dict]:
        out = []
        for row, path in zip(rows, paths or [r["image"] for r in rows]):
            if "caption" in row:
                try:
                    self._write_file(self.caption_path(path), row["caption"])
                except OSError as e:
                    kept = {k: row[k] for k in ("image", "path", "prompt") if k in row}
                    row = {**kept, "error": f"{self.caption_path(path)}: {e.strerror or e}"}
            out.append(row)
        if self.log is not None:
            self.log.write(out)
        return out

    def _write_file(self, target: str, caption: str) -> None:
        # Write a temp file, then move it in place: a kill never leaves a half caption file.
        tmp = f"{target}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(caption + "\n")
        try:
            if self.overwrite:
                os.replace(tmp, target)
            else:
                os.link(tmp, target)  # atomic, and fails if the caption file exists
        except FileExistsError:
            raise FileExistsError(17, "caption file exists (use --overwrite)") from None
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def close(self) -> None:
        if self.log is not None:
            self.log.close()


def merge_parts(out: str, fmt: str, writer) -> int:
    """Append the rows of `out`'s part files that `out` lacks, then delete the parts."""
    parts = part_paths(out)
    if not parts:
        return 0
    done = read_done([out], fmt) if fmt != "txt" else read_done([out])
    merged = 0
    for part in parts:
        batch = []
        for row in iter_rows(part, "jsonl"):
            key = row_key(row)
            if key not in done:
                done.add(key)
                batch.append(row)
        target = writer.log if isinstance(writer, TxtWriter) else writer
        if target is not None:
            target.write(batch)
        merged += len(batch)
    for part in parts:
        os.unlink(part)
    return merged


def _sync(f) -> None:
    f.flush()
    try:
        os.fsync(f.fileno())
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise
        # pipes and some network filesystems cannot fsync; the flush still happened
