"""`vlm score`: how well texts and images agree (BLIP-2's ITC and ITM), for many pairs, to JSONL/CSV."""

from __future__ import annotations

import argparse
import os
import time

from .batch_run import (
    Summary,
    add_run_arguments,
    distributed,
    exit_status,
    finish_outputs,
    hold_output,
    make_writer,
    prepare_outputs,
    sum_over_processes,
    worker_count,
)
from .inputs import check_inputs
from .pairs import SCORE_FIELDS, PairBuilder, ScoreBatch, load_scorer, score_rows  # noqa: F401 (re-exported)
from .ray_cli import add_ray_arguments, ray_main
from .writers import part_path

DESCRIPTION = """\
Score image-text pairs with BLIP-2's stage-1 heads: one row per (image, text) pair,
  {"image": ..., "text": ..., "itc": cosine similarity (-1..1), "itm": match probability (0..1)}
  {"image": ..., "text": ..., "error": ...}          the image could not be read

Pairs: every image of INPUT with every --text, or a .csv/.jsonl list whose rows have an 'image'
and a 'text' column (then each row is one pair; --text adds nothing to rows that have a text).
Uses: filtering a dataset's pairs by agreement (keep rows with itm > 0.5), ranking candidate
captions, zero-shot labels (--text "a photo of a cat" --text "a photo of a dog").

The model needs the stage-1 parts: an official Blip2ForImageTextRetrieval checkpoint
(Salesforce/blip2-itm-vit-g), a `vlm train --recipe stage1` output, or a model trained from one.
Resumable like `vlm caption`: re-run the same command and the pairs already written are skipped.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlm score", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders, globs or .txt/.csv/.jsonl lists")
    p.add_argument("--text", action="append", default=[], metavar="T", help="a text to score every image against "
                   "(repeatable)")
    p.add_argument("--out", required=True, help="output file (.jsonl or .csv); re-running with it resumes")
    p.add_argument("--format", choices=["jsonl", "csv"], help="default: from --out's extension, else jsonl")
    add_run_arguments(p, batch_default=64, what="pairs")
    p.add_argument("--overwrite", action="store_true", help="start --out afresh instead of resuming")
    add_ray_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run `vlm score`; returns the exit status (as `vlm caption`'s)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if (code := ray_main(parser, args, "score")) is not None:
        return code
    fmt = args.format or ("csv" if args.out.lower().endswith(".csv") else "jsonl")
    check_inputs(args.inputs)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    rank, world, state = distributed(args.device)
    lock = hold_output(args.out, state, "vlm score")
    try:
        summary = _score_all(args, fmt, rank, world, state)
    finally:
        if lock is not None:
            lock.release()
    return exit_status(summary, args.max_error_rate)


def _score_all(args: argparse.Namespace, fmt: str, rank: int, world: int, state) -> Summary:
    """Score every pending pair, writing rows after each batch; merge parts and print the summary."""
    from tqdm import tqdm

    from .pipeline import PendingBatches, batch_loader, count_pending

    done = prepare_outputs(args.out, args.overwrite, fmt, state)
    writer = make_writer(fmt, part_path(args.out, rank) if world > 1 else args.out, part=world > 1,
                         fields=SCORE_FIELDS)
    model, processor = load_scorer(args, args.device or (str(state.device) if state is not None else None))
    builder = PairBuilder(processor, args.text)
    pending = PendingBatches(args.inputs, done, args.batch_size, builder.key, rank, world, expand=builder.expand)
    total = None if args.no_progress else count_pending(args.inputs, done, builder.key, world, builder.expand)
    summary = Summary(verb="scored", unit="pairs")
    start = time.perf_counter()
    bar = tqdm(total=total, unit="pair", desc="score", disable=args.no_progress or None, dynamic_ncols=True)
    try:
        for batch in batch_loader(pending, builder, worker_count(args.num_workers)):
            rows = writer.write(score_rows(model, processor.qformer_tokenizer, batch))
            summary.errors += sum("error" in r for r in rows)
            summary.done += sum("error" not in r for r in rows)
            bar.update(len(rows))
    finally:
        bar.close()
        writer.close()
    summary.skipped = pending.skipped_done + pending.skipped_here
    if state is not None:
        sum_over_processes(summary, pending.skipped_done, pending.skipped_here, state)
    summary.seconds = time.perf_counter() - start
    if rank == 0:
        finish_outputs(args.out, fmt, summary, 0, fields=SCORE_FIELDS)
    return summary
