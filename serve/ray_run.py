"""`vlm caption --ray` / `vlm score --ray`: the one-machine work, on Ray Data actors.

The driver (this process) lists the inputs exactly as the one-machine commands do, skips what
the output folder already holds, and cuts the rest into chunks of `--shard-size` work items
(`PendingBatches`, the one-machine planner). Ray Data runs the chunks on a pool of actors
(`ShardCaptioner` / `ShardScorer`: `vlm.serve.ray_data`'s classes, model loaded once each);
an actor turns a chunk into rows with the one-machine builders and writes them as one shard
(`ray_shards`: atomic, named after the chunk, so a redone chunk replaces rather than repeats).
Ray redoes the chunks of an actor that dies (it restarts actors and retries their tasks).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator

import numpy as np

from vlm.errors import VLMError

from .batch_run import Summary, exit_status, hold_output
from .inputs import Item
from .pipeline import BatchBuilder, PendingBatches
from .ray_data import Captioner, Scorer
from .ray_inputs import check_ray_inputs, list_inputs
from .ray_shards import clean_folder, prepare_folder, settle, shard_name, write_shard
from .pairs import PairBuilder

DEFAULT_SHARD_SIZE = 1000


class _CaptionKeys:
    """`BatchBuilder.key` without a processor: a row's identity depends only on --question."""

    question_for = BatchBuilder.question_for
    fields = BatchBuilder.fields
    key = BatchBuilder.key

    def __init__(self, question: str | None):
        self.question = question


class _PairKeys:
    """`PairBuilder.expand` and `key` without a processor: pairs depend only on --text."""

    expand = PairBuilder.expand
    key = staticmethod(PairBuilder.key)

    def __init__(self, texts: list[str]):
        self.texts = texts


class _WritesShards:
    """Makes a Ray Data callable write each chunk of work it is given as one shard of `out`."""

    def __init__(self, out: str, shard_format: str, **kwargs):
        super().__init__(**kwargs)
        self.out, self.shard_format = out, shard_format

    def __call__(self, batch) -> dict[str, np.ndarray]:
        """Rows of each chunk in `batch` (columns `shard`, `items`), written as that chunk's shard."""
        counts: dict[str, list] = {"shard": [], "rows": [], "errors": []}
        for name, payload in zip(batch["shard"], batch["items"]):
            rows = self.rows([Item(**fields) for fields in json.loads(payload)])
            write_shard(self.out, str(name), rows, self.shard_format, self.fields)
            counts["shard"].append(str(name))
            counts["rows"].append(len(rows))
            counts["errors"].append(sum("error" in r for r in rows))
        return {k: np.array(v) for k, v in counts.items()}


class ShardCaptioner(_WritesShards, Captioner):
    """A `Captioner` actor that writes each chunk of images as one shard of `out`."""


class ShardScorer(_WritesShards, Scorer):
    """A `Scorer` actor that writes each chunk of (image, text) pairs as one shard of `out`."""


@dataclasses.dataclass
class Job:
    """What differs between captioning and scoring on Ray."""

    actor: type
    kwargs: dict
    key: Callable[[Item], tuple]
    expand: Callable[[Item], Iterable[Item]] | None
    summary: Summary


def make_job(args: argparse.Namespace, command: str) -> Job:
    """The actor class, its arguments and the item identity for `command`."""
    model = os.path.abspath(args.model) if args.model and os.path.exists(args.model) else args.model
    common = dict(out=os.path.abspath(args.out), shard_format=args.shard_format or "jsonl", model=model,
                  batch_size=args.batch_size, device=args.device, dtype=args.dtype, quantization=args.quantization,
                  num_threads=max(1, int(args.num_cpus or 1)), workdir=os.getcwd(), quiet=quiet())
    if command == "caption":
        keys = _CaptionKeys(args.question)
        kwargs = dict(prompt=args.prompt, question=args.question, max_new_tokens=args.max_new_tokens,
                      num_beams=args.num_beams)
        return Job(ShardCaptioner, {**common, **kwargs}, keys.key, None, Summary())
    pairs = _PairKeys(args.text)
    return Job(ShardScorer, {**common, "texts": args.text}, pairs.key, pairs.expand,
               Summary(verb="scored", unit="pairs"))


def plan(args: argparse.Namespace, job: Job, done: set[tuple]) -> tuple[list[dict], int]:
    """(chunks of pending work as Ray rows, items skipped as done or repeated)."""
    pending = PendingBatches(args.inputs, done, args.shard_size or DEFAULT_SHARD_SIZE, job.key,
                             expand=job.expand, listing=list_inputs)
    chunks = [{"shard": shard_name([job.key(item) for item in items]), "size": len(items),
               "items": json.dumps([dataclasses.asdict(item) for item in items], ensure_ascii=False)}
              for items in pending]
    return chunks, pending.skipped_done


def run(args: argparse.Namespace, command: str) -> int:
    """`vlm caption --ray` / `vlm score --ray`: returns the exit status (`ray_cli` checked that
    Ray Data imports)."""
    import ray
    import ray.data  # noqa: F401
    check_ray_inputs(args.inputs)
    # One run per folder (the one-machine lock, on a file inside it): two would both do all the work.
    lock = hold_output(prepare_folder(args.out), None, f"vlm {command} --ray")
    try:
        return _run_locked(ray, args, command)
    finally:
        lock.release()


def _run_locked(ray, args: argparse.Namespace, command: str) -> int:
    clean_folder(args.out, args.overwrite)
    job = make_job(args, command)
    done, _ = settle(args.out, job.actor.fields)
    chunks, skipped = plan(args, job, done)
    summary = job.summary
    summary.skipped = skipped
    with ray_session(ray, args.ray), sticky_interrupt() as interrupted:  # after ray.init: ours is the handler
        start = time.perf_counter()
        if chunks:
            execute(ray, args, job, chunks, summary, interrupted)
        summary.seconds = time.perf_counter() - start
    _, removed = settle(args.out, job.actor.fields)
    if removed:  # see ray_shards: only a worker outliving an earlier, interrupted driver makes these
        print(f"removed {removed} rows already in other shards", file=sys.stderr)
    print(summary.line() + f" -> {args.out}", file=sys.stderr)
    if summary.done == 0 and summary.errors == 0 and summary.skipped == 0:
        print(f"no {summary.unit} found in the inputs", file=sys.stderr)
    return exit_status(summary, args.max_error_rate)


def quiet() -> bool:
    """Whether the `vlm` command keeps library chatter off stderr here (no --verbose): the actors
    and Ray's own driver-side logging follow it."""
    return logging.getLogger("transformers").level >= logging.ERROR


@contextlib.contextmanager
def sticky_interrupt() -> Iterator[threading.Event]:
    """Ctrl-C raises KeyboardInterrupt as usual and is also remembered: when the signal lands
    inside Ray's own code the exception can be lost there (one CI run went on to the end and
    exited 0), so the run checks the event as rows arrive and once more when it ends."""
    interrupted = threading.Event()
    if threading.current_thread() is not threading.main_thread():  # Python use from a thread: no signals
        yield interrupted
        return

    def handler(signum, frame):
        interrupted.set()
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield interrupted
    finally:
        signal.signal(signal.SIGINT, previous)
    if interrupted.is_set():
        raise KeyboardInterrupt


@contextlib.contextmanager
def ray_session(ray, address: str):
    """Connect to `address` (or start a local instance with one CPU per core) unless Ray is up."""
    if ray.is_initialized():  # a caller's own session (Python use of `main`)
        yield
        return
    options = dict(include_dashboard=False, logging_level=logging.ERROR if quiet() else logging.INFO)
    if address == "local":
        ray.init(address="local", num_cpus=os.cpu_count(), **options)
    else:
        ray.init(address=address, **options)
    try:
        yield
    finally:
        ray.shutdown()


def execute(ray, args: argparse.Namespace, job: Job, chunks: list[dict], summary: Summary,
            interrupted: threading.Event) -> None:
    """Run `chunks` through a pool of actors, counting rows as the shards land (progress bar),
    until they are all done or `interrupted` is set."""
    from ray.data import DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = False  # ours counts images, not blocks
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # its notices (bars off, plans) are noise here
    num_cpus, num_gpus = args.num_cpus or 1.0, args.num_gpus or 0.0
    resources = ray.cluster_resources()
    fit = resources.get("GPU", 0) // num_gpus if num_gpus else resources.get("CPU", 1) // num_cpus
    actors = min(args.concurrency or max(1, int(fit)), len(chunks))
    ds = ray.data.from_items(chunks, override_num_blocks=len(chunks)).map_batches(
        job.actor, batch_size=1, fn_constructor_kwargs=job.kwargs, compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=num_cpus, num_gpus=num_gpus or None)
    bar = summary.progress_bar(sum(c["size"] for c in chunks), f"ray x{actors}", args.no_progress)
    try:
        for row in ds.iter_rows():
            if interrupted.is_set():
                raise KeyboardInterrupt
            summary.record(bar, int(row["rows"]), int(row["errors"]))
    except ray.exceptions.RayActorError as e:
        if not e.actor_init_failed:
            raise
        # A bad --model fails in every actor's __init__: say so in one line, as one machine would.
        raise VLMError(f"the actors could not start: {init_error(str(e))}") from None
    finally:
        bar.close()


def init_error(message: str) -> str:
    """The `VLMError` text inside Ray's report of a failed actor `__init__`, else its last line."""
    marker = "VLMError: "
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    found = [line.split(marker, 1)[1] for line in lines if marker in line]
    return found[-1] if found else (lines[-1] if lines else "unknown error")
