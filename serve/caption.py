"""`vlm caption`: caption (or ask questions about) many images, resumably, to JSONL/CSV/txt."""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass


from .inputs import check_inputs
from .writers import FORMATS, CsvWriter, JsonlWriter, TxtWriter, merge_parts, part_path, part_paths, read_done

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
        prog="vlm caption", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders, globs or .txt/.csv/.jsonl lists")
    p.add_argument("--out", help="output file (required unless --format txt); re-running with it resumes")
    p.add_argument("--format", choices=FORMATS, help="output format (default: from --out's extension, else jsonl)")
    p.add_argument("--model", help="checkpoint folder or hub id (default: the offline demo model)")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--prompt", help="caption prompt, e.g. 'a photo of' (default: the model's saved caption prompt)")
    what.add_argument("--question", help="ask this question about every image (VQA); rows get question/answer")
    p.add_argument("--batch-size", type=_positive, default=16, help="images per model call (default 16)")
    p.add_argument("--max-new-tokens", type=_positive, default=30, help="longest caption in tokens (default 30)")
    p.add_argument("--num-beams", type=_positive, default=1, help="beam search width; 1 = greedy (default)")
    p.add_argument("--quantization", choices=["4bit", "8bit", "none"], help="load the LLM in 4-bit or 8-bit")
    p.add_argument("--num-workers", type=_non_negative, default=None,
                   help="processes decoding and resizing images (default: min(4, CPUs - 1); 0 = inline)")
    p.add_argument("--overwrite", action="store_true",
                   help="start --out afresh instead of resuming; with --format txt, replace caption files")
    p.add_argument("--device", help="cuda, cuda:1, cpu (default: CUDA when available)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="weights dtype (default: bf16 on GPUs that support it, fp32 on CPU; bfloat16 is faster on "
                        "CPUs with AVX512-BF16/AMX, but its greedy captions can differ from fp32 ones)")
    p.add_argument("--max-error-rate", type=_fraction, default=0.5, metavar="F",
                   help="exit non-zero when more than this fraction of the run's images fail (default 0.5)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


@dataclass
class Summary:
    """What a run did (summed over processes)."""

    captioned: int = 0
    errors: int = 0
    skipped: int = 0
    seconds: float = 0.0

    def line(self) -> str:
        rate = self.captioned / self.seconds if self.seconds else 0.0
        return (f"captioned {self.captioned}, errors {self.errors}, skipped {self.skipped} (already done) "
                f"in {self.seconds:.1f}s ({rate:.2f} images/s)")


def _distributed(device: str | None):
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


def _make_writer(fmt: str, path: str | None, overwrite: bool = False, part: bool = False):
    """The writer for `path`; part files (multi-process) are always JSONL, merged at the end."""
    if fmt == "txt":
        return TxtWriter(JsonlWriter(path) if path else None, overwrite)
    return CsvWriter(path) if fmt == "csv" and not part else JsonlWriter(path)


def main(argv: list[str] | None = None) -> int:
    """Run `vlm caption`; returns the exit status (see --help)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    fmt = args.format or ("csv" if (args.out or "").lower().endswith(".csv") else "jsonl")
    if args.out is None and fmt != "txt":
        parser.error("--out is required (or use --format txt to write captions beside the images)")
    if fmt == "txt" and args.question:
        parser.error("--format txt writes one caption per image; --question needs --format jsonl or csv")
    check_inputs(args.inputs)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # workers are forked after tokenizing
    summary = run(args, fmt)
    return exit_status(summary, args.max_error_rate)


def exit_status(summary: Summary, max_error_rate: float) -> int:
    """0 for a run whose failures stay within `max_error_rate`, 1 otherwise or when nothing was found."""
    attempted = summary.captioned + summary.errors
    if attempted == 0:
        return 0 if summary.skipped > 0 else 1
    if summary.errors / attempted > max_error_rate:
        print(f"error: {summary.errors} of {attempted} images failed, over --max-error-rate {max_error_rate}",
              file=sys.stderr)
        return 1
    return 0


def run(args: argparse.Namespace, fmt: str) -> Summary:
    """Load the model, caption everything pending, merge multi-process parts; print a summary."""
    from vlm.engine import GenerationSettings, InferenceEngine
    from vlm.loading import load_pretrained

    from .pipeline import BatchBuilder, PendingBatches

    rank, world, state = _distributed(args.device)
    done = _prepare_outputs(args, fmt, state)
    writer = _make_writer(fmt, part_path(args.out, rank) if (world > 1 and args.out) else args.out,
                          args.overwrite, part=world > 1)
    device = args.device or (str(state.device) if state is not None else None)
    model, processor = load_pretrained(args.model, quantization=args.quantization, device=device, dtype=args.dtype)
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, num_beams=args.num_beams)
    builder = BatchBuilder(processor, prompt=args.prompt, question=args.question, allow_questions=fmt != "txt",
                           settings=settings)
    skip = (lambda item: writer.exists(item.path)) if fmt == "txt" else None
    pending = PendingBatches(args.inputs, done, args.batch_size, builder.key, rank, world, skip)
    # Captioning rarely sees an image twice across batches: a small feature cache is enough.
    engine = InferenceEngine(model, processor, max_batch_size=args.batch_size, feature_cache_bytes=256 << 20)

    start = time.perf_counter()
    summary = _caption_all(args, fmt, engine, builder, pending, writer, rank, world, done)
    summary.skipped = pending.skipped_done + pending.skipped_here
    if state is not None:
        _sum_over_processes(summary, pending, state)
    summary.seconds = time.perf_counter() - start
    if rank == 0:
        _finish(args, fmt, summary, engine.batches.oom_splits)
    return summary


def _prepare_outputs(args: argparse.Namespace, fmt: str, state) -> set[tuple]:
    """Clear the outputs for --overwrite, then read what is already done (the same in every process)."""
    out = args.out
    if (state is None or state.is_main_process) and args.overwrite and out:
        for stale in [out, *part_paths(out)]:
            if os.path.exists(stale):
                os.unlink(stale)
    if state is not None:
        state.wait_for_everyone()  # nobody reads the done-set before a fresh start cleared it
    done = read_done([out, *part_paths(out)] if out else [], fmt)
    if state is not None:
        state.wait_for_everyone()  # every process holds the same done-set before anyone writes
    return done


def _caption_all(args, fmt, engine, builder, pending, writer, rank: int, world: int, done) -> Summary:
    """Caption every pending batch, writing each batch's rows as soon as it is done."""
    from tqdm import tqdm

    from .pipeline import batch_loader, caption_rows, count_pending

    summary = Summary()
    total = count_pending(args.inputs, done, builder.key, world) if not args.no_progress else None
    workers = args.num_workers if args.num_workers is not None else min(4, max(0, (os.cpu_count() or 1) - 1))
    bar = tqdm(total=total, unit="img", desc=f"caption[{rank}]" if world > 1 else "caption",
               disable=args.no_progress or None, dynamic_ncols=True, smoothing=0.1)
    try:
        for batch in batch_loader(pending, builder, workers):
            rows = caption_rows(engine, batch, builder)
            rows = writer.write(rows, [it.path for it in batch.items]) if fmt == "txt" else writer.write(rows)
            errors = sum("error" in r for r in rows)
            summary.errors += errors
            summary.captioned += len(rows) - errors
            bar.update(len(rows))
            bar.set_postfix(errors=summary.errors, refresh=False)
    finally:
        bar.close()
        writer.close()
    return summary


def _sum_over_processes(summary: Summary, pending, state) -> None:
    import torch

    counts = torch.tensor([summary.captioned, summary.errors, pending.skipped_here], device=state.device)
    torch.distributed.all_reduce(counts)
    summary.captioned, summary.errors = int(counts[0]), int(counts[1])
    summary.skipped = pending.skipped_done + int(counts[2])
    state.wait_for_everyone()  # all parts complete before the merge


def _finish(args: argparse.Namespace, fmt: str, summary: Summary, oom_splits: int) -> None:
    """Merge the process parts into --out and print the summary (main process)."""
    if args.out:
        final = _make_writer(fmt, args.out)
        try:
            merge_parts(args.out, fmt, final)
        finally:
            final.close()
    if oom_splits:
        print(f"out of memory {oom_splits} times: batches were split and retried", file=sys.stderr)
    print(summary.line() + (f" -> {args.out}" if args.out else ""), file=sys.stderr)
    if summary.captioned == 0 and summary.errors == 0 and summary.skipped == 0:
        print("no images found in the inputs", file=sys.stderr)


if __name__ == "__main__":
    from vlm.cli import main as cli_main

    sys.exit(cli_main(["caption", *sys.argv[1:]]))
