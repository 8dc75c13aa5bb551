"""What `vlm caption` and `vlm score` share around their model: flags, processes, outputs, summary.

Both stream work items from INPUTs (`inputs.py`), skip those already written to `--out`, split the
rest over the processes of a multi-process launch, write rows after every batch (`writers.py`),
merge the processes' part files at the end and exit non-zero past `--max-error-rate`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from vlm.errors import VLMError
from vlm.load_policy import add_load_arguments

from .writers import (
    CSV_FIELDS,
    CsvWriter,
    JsonlWriter,
    TxtWriter,
    check_folder,
    merge_parts,
    part_path,
    part_paths,
    read_done,
)


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value}")
    return value


def add_run_arguments(p: argparse.ArgumentParser, batch_default: int, what: str) -> None:
    """The flags every batch command has (`what`: the thing a row is about, for the help)."""
    add_load_arguments(p)
    p.add_argument("--batch-size", type=positive, default=batch_default,
                   help=f"{what} per model call (default {batch_default})")
    p.add_argument("--num-workers", type=non_negative, default=None,
                   help="processes decoding and resizing images (default: min(4, CPUs - 1); 0 = inline)")
    p.add_argument("--max-error-rate", type=fraction, default=0.5, metavar="F",
                   help=f"exit non-zero when more than this fraction of the run's {what} fail (default 0.5)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def worker_count(requested: int | None) -> int:
    return requested if requested is not None else min(4, max(0, (os.cpu_count() or 1) - 1))


@dataclass
class Summary:
    """What a run did (summed over processes)."""

    done: int = 0
    errors: int = 0
    skipped: int = 0
    seconds: float = 0.0
    verb: str = "captioned"
    unit: str = "images"

    def line(self) -> str:
        rate = self.done / self.seconds if self.seconds else 0.0
        return (f"{self.verb} {self.done}, errors {self.errors}, skipped {self.skipped} (already done) "
                f"in {self.seconds:.1f}s ({rate:.2f} {self.unit}/s)")

    def progress_bar(self, total: int | None, desc: str, disable: bool):
        """A tqdm bar counting this run's units (fed by `record`)."""
        from tqdm import tqdm

        unit = self.unit[:-1] if self.unit.endswith("s") else self.unit
        return tqdm(total=total, unit=unit, desc=desc, disable=disable or None, dynamic_ncols=True, smoothing=0.1)

    def record(self, bar, rows: int, errors: int) -> None:
        """Count `rows` finished rows, `errors` of them error rows, here and on `bar`."""
        self.errors += errors
        self.done += rows - errors
        bar.update(rows)
        bar.set_postfix(errors=self.errors, refresh=False)


def exit_status(summary: Summary, max_error_rate: float) -> int:
    """0 for a run whose failures stay within `max_error_rate`, 1 otherwise or when nothing was found."""
    attempted = summary.done + summary.errors
    if attempted == 0:
        return 0 if summary.skipped > 0 else 1
    if summary.errors / attempted > max_error_rate:
        print(f"error: {summary.errors} of {attempted} {summary.unit} failed, over --max-error-rate {max_error_rate}",
              file=sys.stderr)
        return 1
    return 0


def distributed(device: str | None):
    """(rank, world, accelerate state or None); a state only under a multi-process launcher."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, None
    import torch
    from accelerate import PartialState

    # accelerate only sets up CPU processes (gloo) when asked to; without CUDA there is no choice.
    cpu = (os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
           or not torch.cuda.is_available() or (device or "").startswith("cpu"))
    state = PartialState(cpu=cpu)
    return state.process_index, state.num_processes, state


def make_writer(fmt: str, path: str | None, overwrite: bool = False, part: bool = False, fields=CSV_FIELDS):
    """The writer for `path`; part files (multi-process) are always JSONL, merged at the end."""
    if fmt == "txt":
        return TxtWriter(JsonlWriter(path) if path else None, overwrite)
    return CsvWriter(path, fields) if fmt == "csv" and not part else JsonlWriter(path)


def lock_path(out: str) -> str:
    """The lock file beside `--out` that one run holds for its whole life."""
    return f"{out}.lock"


def hold_output(out: str | None, state, command: str):
    """Take the exclusive lock on `out` (main process), or raise `VLMError` naming the run that holds
    it: two runs appending to one output would both do every pending image. Returns the held lock
    (release it when the run ends; the OS releases it if the process dies), or None without `out`.
    Under a multi-process launch every process learns whether the main one got it."""
    lock, error = None, None
    if out and (state is None or state.is_main_process):
        try:
            lock = _acquire(out, command)
        except VLMError as e:
            error = e
    if state is not None and state.num_processes > 1:
        import torch

        failed = torch.tensor([error is not None], dtype=torch.int64, device=state.device)
        torch.distributed.all_reduce(failed)
        if failed.item() and error is None:
            raise VLMError(f"{out}: the main process could not lock it (see its error)")
    if error is not None:
        raise error
    return lock


def _acquire(out: str, command: str):
    from filelock import FileLock, Timeout

    check_folder(out)
    path = lock_path(out)
    try:  # created here first: filelock reports a file it cannot create as a lock held by someone else
        open(path, "a").close()
    except OSError as e:
        raise VLMError(f"{out}: cannot write the output ({e.strerror or e})") from None
    lock = FileLock(path, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise VLMError(f"{out}: another {command} run{_owner(path)} is writing it; wait for it to end, or choose "
                       "another --out") from None
    try:  # who holds it, for the message a second run prints (the lock is on the file, not its text)
        with open(path, "w", encoding="utf-8") as f:
            f.write(f"{os.getpid()}\n")
    except OSError:
        pass
    return lock


def _owner(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            pid = f.read().strip()
    except OSError:
        return ""
    return f" (PID {pid})" if pid.isdigit() else ""


def prepare_outputs(out: str | None, overwrite: bool, fmt: str, state) -> set[tuple]:
    """Clear the outputs for --overwrite, then read what is already done (the same in every process)."""
    if (state is None or state.is_main_process) and overwrite and out:
        for stale in [out, *part_paths(out)]:
            if os.path.exists(stale):
                os.unlink(stale)
    if state is not None:
        state.wait_for_everyone()  # nobody reads the done-set before a fresh start cleared it
    done = read_done([out, *part_paths(out)] if out else [], fmt)
    if state is not None:
        state.wait_for_everyone()  # every process holds the same done-set before anyone writes
    return done


def sum_over_processes(summary: Summary, skipped_done: int, skipped_here: int, state) -> None:
    """Totals of every process into `summary` (a collective: every process calls it)."""
    import torch

    counts = torch.tensor([summary.done, summary.errors, skipped_here], device=state.device)
    torch.distributed.all_reduce(counts)
    summary.done, summary.errors = int(counts[0]), int(counts[1])
    summary.skipped = skipped_done + int(counts[2])
    state.wait_for_everyone()  # all parts complete before the merge


def finish_outputs(out: str | None, fmt: str, summary: Summary, oom_splits: int, fields=CSV_FIELDS) -> None:
    """Merge the process parts into `out` and print the summary (main process)."""
    if out:
        final = make_writer(fmt, out, fields=fields)
        try:
            merge_parts(out, fmt, final)
        finally:
            final.close()
    if oom_splits:
        print(f"out of memory {oom_splits} times: batches were split and retried", file=sys.stderr)
    print(summary.line() + (f" -> {out}" if out else ""), file=sys.stderr)
    if summary.done == 0 and summary.errors == 0 and summary.skipped == 0:
        print("no images found in the inputs", file=sys.stderr)


class BatchJob:
    """What one batch command does with a batch of work items; `run_batches` does the rest.

    `builder` is the DataLoader dataset that turns a list of items into a batch in worker
    processes (its `key(item)` is the output row's identity); `expand` (optional) turns an item into
    several (scoring: one per text); `skip` (optional) rejects an item this process would do
    (an existing caption file); `rows(batch)` computes the batch's output rows."""

    builder = None
    expand = None
    skip = None
    oom_splits = 0

    def rows(self, batch) -> list[dict]:
        raise NotImplementedError

    def write(self, writer, rows: list[dict], batch) -> list[dict]:
        """Write `rows`; returns the rows as written (a writer may turn one into an error row)."""
        return writer.write(rows)


def run_batches(args: argparse.Namespace, fmt: str, command: str, summary: Summary, fields: list[str],
                start: Callable[[object, str | None], BatchJob]) -> Summary:
    """The one batch-run loop of `vlm caption` and `vlm score`: lock `--out`, read what is done,
    let `start(writer, device)` load the model, run every pending batch through worker processes
    (rows written and flushed after each, progress shown), sum over processes, merge their parts
    and print the summary."""
    from .pipeline import PendingBatches  # torch: not imported for --help

    rank, world, state = distributed(args.device)
    lock = hold_output(args.out, state, command)
    try:
        done = prepare_outputs(args.out, args.overwrite, fmt, state)
        writer = make_writer(fmt, part_path(args.out, rank) if (world > 1 and args.out) else args.out,
                             args.overwrite, part=world > 1, fields=fields)
        device = args.device or (str(state.device) if state is not None else None)
        try:
            job = start(writer, device)
            pending = PendingBatches(args.inputs, done, args.batch_size, job.builder.key, rank, world, job.skip,
                                     job.expand)
            started = time.perf_counter()
            desc = command.split()[-1] + (f"[{rank}]" if world > 1 else "")
            _run_pending(args, job, pending, writer, summary, done, desc)
        finally:
            writer.close()
        summary.skipped = pending.skipped_done + pending.skipped_here
        if state is not None:
            sum_over_processes(summary, pending.skipped_done, pending.skipped_here, state)
        summary.seconds = time.perf_counter() - started
        if rank == 0:
            finish_outputs(args.out, fmt, summary, job.oom_splits, fields=fields)
        return summary
    finally:
        if lock is not None:
            lock.release()


def _run_pending(args, job: BatchJob, pending, writer, summary: Summary, done, desc: str) -> None:
    from .pipeline import batch_loader, count_pending

    total = None if args.no_progress else count_pending(args.inputs, done, job.builder.key, pending.world, job.expand)
    bar = summary.progress_bar(total, desc, args.no_progress)
    try:
        for batch in batch_loader(pending, job.builder, worker_count(args.num_workers)):
            rows = job.write(writer, job.rows(batch), batch)
            summary.record(bar, len(rows), sum("error" in r for r in rows))
    finally:
        bar.close()
