"""`vlm caption`: caption (or ask questions about) many images, resumably, to JSONL/CSV/txt."""

from __future__ import annotations

import argparse
import os
import sys

from .batch_run import BatchJob, Summary, add_run_arguments, exit_status, positive, run_batches
from .inputs import check_inputs
from .ray_cli import add_ray_arguments, ray_main
from .writers import CSV_FIELDS, FORMATS

DESCRIPTION = """\
Caption images, or answer a question about each, in batches. Resumable: re-run the same
command after a crash or kill and it skips the images already written.

INPUT (any number, mixed):
  photo.jpg                a file (any extension)
  photos/                  a folder, searched recursively for .jpg .jpeg .png .webp .bmp .gif .tif .tiff
  'photos/**/*.png'        a glob (quote it to let vlm expand it rather than the shell)
  list.txt                 one image path a line (# comments allowed)
  list.csv / list.jsonl    an 'image' column/field, optionally 'prompt' or 'question' per row
                           (a question makes that row VQA). Relative paths resolve against the
                           list file's folder.

OUTPUT (--out), one row per input image, with the image path as given:
  {"image": ..., "caption": ...}                       (plus "prompt" when the row had its own)
  {"image": ..., "question": ..., "answer": ...}       with --question or a per-row question
  {"image": ..., "error": ...}                         the file could not be read or captioned
                                                       (plus the row's "question" or "prompt")
  A list entry with a relative path also gets "path", the absolute file it resolved to.
  --format csv writes the same fields as columns. --format txt writes each caption to a .txt
  beside its image (photo.jpg -> photo.txt), never replacing one without --overwrite; --out
  is then optional and, if given, logs the rows as JSONL.

RESUME: rows are appended and flushed after every batch. Re-running with the same --out skips
every image (file + question, or file + per-row prompt) that already has a row (error rows
included: delete those lines to retry them); a half-written last line from a killed run is
discarded. --overwrite starts afresh. The same file named twice is captioned once.

Several GPUs or CPU processes: launch with accelerate (or torchrun); each process takes its
share (OUT.part<rank>.jsonl) and the rows are merged into --out at the end:
  accelerate launch --num_processes 2 -m vlm.cli caption photos/ --out captions.jsonl
  ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \\
      --mixed_precision no --dynamo_backend no -m vlm.cli caption photos/ --out captions.jsonl

Exit status: 0 when the images were captioned (errors, if any, are in the output and the
summary) or everything was already done; 1 when more than --max-error-rate of this run's images
failed (by default half), nothing could be captioned (no images found), or on a bad model/path;
2 for bad flags. Only expected failures become error rows (a file that will not decode, a prompt
the chat template rejects, an image that does not fit in memory even alone); anything else is a
bug and stops the run with its traceback (rows written so far are kept; re-run to resume).
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vlm caption", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders, globs or .txt/.csv/.jsonl lists")
    p.add_argument("--out", help="output file (required unless --format txt); re-running with it resumes")
    p.add_argument("--format", choices=FORMATS, help="output format (default: from --out's extension, else jsonl)")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--prompt", help="caption prompt, e.g. 'a photo of' (default: the model's saved caption prompt)")
    what.add_argument("--question", help="ask this question about every image (VQA); rows get question/answer")
    add_run_arguments(p, batch_default=16, what="images")
    p.add_argument("--max-new-tokens", type=positive, default=30, help="longest caption in tokens (default 30)")
    p.add_argument("--num-beams", type=positive, default=1, help="beam search width; 1 = greedy (default)")
    p.add_argument("--overwrite", action="store_true",
                   help="start --out afresh instead of resuming; with --format txt, replace caption files")
    add_ray_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run `vlm caption`; returns the exit status (see --help)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if (code := ray_main(parser, args, "caption")) is not None:
        return code
    fmt = args.format or ("csv" if (args.out or "").lower().endswith(".csv") else "jsonl")
    if args.out is None and fmt != "txt":
        parser.error("--out is required (or use --format txt to write captions beside the images)")
    if fmt == "txt" and args.question:
        parser.error("--format txt writes one caption per image; --question needs --format jsonl or csv")
    check_inputs(args.inputs)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # workers are forked after tokenizing
    summary = run(args, fmt)
    return exit_status(summary, args.max_error_rate)


def run(args: argparse.Namespace, fmt: str) -> Summary:
    """Load the model, caption everything pending, merge multi-process parts; print a summary.
    The run holds `--out`'s lock throughout (a second run on the same output exits at once)."""
    return run_batches(args, fmt, "vlm caption", Summary(), CSV_FIELDS, lambda writer, device: CaptionJob(
        args, fmt, writer, device))


class CaptionJob(BatchJob):
    """Captions (or answers) for a batch of images, through the inference engine."""

    def __init__(self, args: argparse.Namespace, fmt: str, writer, device: str | None):
        from vlm.engine import GenerationSettings, InferenceEngine
        from vlm.load_policy import load_from_args

        from .pipeline import BatchBuilder

        loaded = load_from_args(args, device)
        settings = GenerationSettings(max_new_tokens=args.max_new_tokens, num_beams=args.num_beams)
        self.builder = BatchBuilder(loaded.processor, prompt=args.prompt, question=args.question,
                                    allow_questions=fmt != "txt", settings=settings)
        self.txt = fmt == "txt"
        self.skip = (lambda item: writer.exists(item.path)) if self.txt else None
        # Captioning rarely sees an image twice across batches: a small feature cache is enough.
        self.engine = InferenceEngine(loaded.model, loaded.processor, max_batch_size=args.batch_size,
                                      feature_cache_bytes=256 << 20)

    @property
    def oom_splits(self) -> int:
        return self.engine.batches.oom_splits

    def rows(self, batch) -> list[dict]:
        from .pipeline import caption_rows

        return caption_rows(self.engine, batch, self.builder)

    def write(self, writer, rows: list[dict], batch) -> list[dict]:
        return writer.write(rows, [item.path for item in batch.items]) if self.txt else writer.write(rows)


if __name__ == "__main__":
    from vlm.cli import main as cli_main

    sys.exit(cli_main(["caption", *sys.argv[1:]]))
