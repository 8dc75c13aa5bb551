"""`vlm score`: how well texts and images agree (BLIP-2's ITC and ITM), for many pairs, to JSONL/CSV."""

from __future__ import annotations

import argparse
import os

from .batch_run import BatchJob, Summary, add_run_arguments, exit_status, run_batches
from .inputs import check_inputs
from .pairs import SCORE_FIELDS, PairBuilder, ScoreBatch, load_scorer, score_rows  # noqa: F401 (re-exported)
from .ray_cli import add_ray_arguments, ray_main

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
    summary = run_batches(args, fmt, "vlm score", Summary(verb="scored", unit="pairs"), SCORE_FIELDS,
                          lambda writer, device: ScoreJob(args, device))
    return exit_status(summary, args.max_error_rate)


class ScoreJob(BatchJob):
    """ITC and ITM for a batch of (image, text) pairs."""

    def __init__(self, args: argparse.Namespace, device: str | None):
        self.model, processor = load_scorer(args, device)
        self.tokenizer = processor.qformer_tokenizer
        self.builder = PairBuilder(processor, args.text)
        self.expand = self.builder.expand

    def rows(self, batch) -> list[dict]:
        return score_rows(self.model, self.tokenizer, batch)

