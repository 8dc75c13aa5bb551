"""`vlm eval`: score a model on caption (CIDEr, BLEU-4) or VQA (VQAv2 accuracy) data.

Generates in left-padded batches with the prompts saved with the checkpoint
(`processor.caption_prompt` for captions, `processor.format_question` for questions), prints a
JSON summary on stdout, and writes one JSON line per sample with `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from vlm.load_policy import add_load_arguments
from vlm.errors import VLMError
from vlm.metrics import K_TEST

# BLIP-2's decoding for its paper tables (design.md section 4).
DEFAULTS = {
    "caption": {"num_beams": 5, "max_new_tokens": 30, "min_new_tokens": 8, "length_penalty": 1.0},
    "vqa": {"num_beams": 5, "max_new_tokens": 10, "min_new_tokens": 0, "length_penalty": -1.0},
    # A conversation's last answer, greedy (chat models are served greedy by default).
    "chat": {"num_beams": 1, "max_new_tokens": 32, "min_new_tokens": 0, "length_penalty": 1.0},
}
# Per-group VQA reports, when the data has these fields (VQAv2 annotations do).
GROUP_FIELDS = ("question_type", "answer_type", "kind")
PREDICT_CHUNK_BATCHES = 32  # examples whose images are decoded at once: this many batches


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vlm eval",
        allow_abbrev=False,  # an unknown flag is an error, never a guessed prefix
        description="Score a model on caption data (CIDEr-D, BLEU-1..4, exact match) or VQA data (VQAv2 accuracy: soft "
        "score over 10 human answers, exact match when fewer). Scores are printed x100, as papers "
        "print them. Data: any format `vlm train` reads (COCO/Karpathy captions, VQAv2 "
        "questions[,annotations], JSONL/CSV rows, a datasets folder, an imagefolder).",
    )
    add_load_arguments(p)
    p.add_argument("--data", required=True, help="data file or folder (for VQAv2: QUESTIONS.json[,ANNOTATIONS.json])")
    p.add_argument("--task", required=True, choices=["caption", "vqa", "chat", "retrieval"],
                   help="what to score (chat: the last assistant turn of each conversation, given the turns "
                        "before it and its images, scored like a VQA answer; retrieval: image<->text "
                        "recall@1/5/10 with ITC + ITM, on caption data; needs a model with BLIP-2's stage-1 heads)")
    p.add_argument("--k-test", type=int, default=K_TEST,
                   help=f"retrieval: ITC candidates per query re-ranked by ITM (default {K_TEST}, as LAVIS)")
    p.add_argument("--out", help="write per-sample predictions and scores here (JSONL)")
    p.add_argument("--split", default="test", help="split of a Karpathy JSON or datasets folder (default: test)")
    p.add_argument("--image-root", help="folder relative image paths are under (default: the data file's folder)")
    p.add_argument("--image-column", default="image", help="image column of row/datasets data (default: image)")
    p.add_argument("--text-column", default="text", help="caption column of row/datasets data (default: text)")
    p.add_argument("--skip-bad-images", action="store_true", help="skip rows whose image is missing/broken (counted)")
    p.add_argument("--limit", type=int, help="score only the first N samples (images for captions, questions for VQA)")
    p.add_argument("--batch-size", type=int, default=8, help="images per generate call (default: 8)")
    p.add_argument("--max-new-tokens", type=int, help="default: 30 for captions, 10 for VQA (BLIP-2's settings)")
    p.add_argument("--min-new-tokens", type=int, help="default: 8 for captions, 0 for VQA")
    p.add_argument("--num-beams", type=int, help="beam width (default: 5; 1 is greedy)")
    p.add_argument("--length-penalty", type=float, help="beam length penalty (default: 1 for captions, -1 for VQA)")
    return p


def generation_kwargs(task: str, args: argparse.Namespace) -> dict:
    """Decoding settings (`GenerationSettings` fields, greedy or beam search): the flags, else
    BLIP-2's paper defaults for the task."""
    out = {}
    for key in ("num_beams", "max_new_tokens", "min_new_tokens", "length_penalty"):
        value = getattr(args, key)
        out[key] = DEFAULTS[task][key] if value is None else value
    for key in ("num_beams", "max_new_tokens"):
        if out[key] < 1:
            raise VLMError(f"--{key.replace('_', '-')} must be at least 1, got {out[key]}")
    # A minimum above the maximum only makes transformers warn and stop at the maximum; cap it.
    out["min_new_tokens"] = min(out["min_new_tokens"], out["max_new_tokens"])
    if out["num_beams"] == 1:
        out.pop("length_penalty")  # only beam search uses it
    return out


def caption_items(examples: Sequence) -> list[tuple]:
    """One (example, references) per image: COCO-style data has a row per caption of an image."""
    from vlm.data import image_key

    groups: dict = {}
    for e in examples:
        # In-memory images (a datasets folder has a row per caption) group by their pixels.
        key = e.image if isinstance(e.image, str) else image_key(e.image)
        groups.setdefault(key, []).append(e)
    items = []
    for group in groups.values():
        if all(e.answers == group[0].answers for e in group) and group[0].answers:
            refs = list(group[0].answers)  # the reader already gathered every caption of the image
        else:
            refs = [c for e in group for c in (e.answers or [e.caption])]
        items.append((group[0], refs))
    return items


def predict(model, processor, examples: Sequence, task: str, batch_size: int, gen_kwargs: dict) -> list[str]:
    """Generated text for each example, in batches on the inference engine, with the checkpoint's
    prompts. Images are decoded a chunk of examples at a time (a whole VQAv2 split of pixels would
    not fit in memory); within a chunk each image is decoded and encoded once however many
    questions it has."""
    from tqdm.auto import tqdm

    from vlm.engine import GenerationSettings, InferenceEngine

    settings = GenerationSettings(**gen_kwargs)
    engine = InferenceEngine(model, processor, max_batch_size=batch_size)
    chunk = batch_size * PREDICT_CHUNK_BATCHES
    texts: list[str] = []
    with tqdm(total=len(examples), desc="generating", unit="sample", file=sys.stderr) as bar:
        for start in range(0, len(examples), chunk):
            requests = _requests(engine, processor, examples[start:start + chunk], task, settings)
            texts.extend(c.text for c in engine.generate(requests, on_batch=bar.update))
    return texts


def _requests(engine, processor, examples: Sequence, task: str, settings) -> list:
    from vlm.data import open_example_image
    from vlm.engine import Request

    opened: dict = {}
    requests = []
    for e in examples:
        pixels = []
        for image in e.images:
            key = image if isinstance(image, str) else id(image)
            if key not in opened:
                opened[key] = engine.encoder.pixels(open_example_image(e, image))
            pixels.append(opened[key])
        requests.append(Request(_prompt(processor, e, task), pixels, settings))
    return requests


def _prompt(processor, example, task: str) -> str:
    """What the model reads for an example: the caption prompt, the question's template, or the
    conversation up to (not including) its last assistant turn, with the chat template."""
    if task == "caption":
        return processor.caption_prompt or ""
    if task == "chat":
        return processor.format_chat(example.conversation[:-1])
    return processor.format_question(example.question)


def chat_references(examples: Sequence) -> list[list[str]]:
    """The reference answer of each conversation: its last turn, which must be the assistant's."""
    out = []
    for e in examples:
        if not e.conversation or e.conversation[-1]["role"] != "assistant":
            raise VLMError(f"{e.source}: a chat eval row must end with the assistant turn to compare with")
        out.append([e.conversation[-1]["content"]])
    return out


def score(task: str, examples: Sequence, references: Sequence[list[str]], predictions: Sequence[str]) -> tuple[dict, list[dict]]:
    """(summary metrics x100, per-sample records)."""
    from vlm.metrics import caption_scores, vqa_accuracy

    records = []
    if task == "caption":
        result = caption_scores(predictions, references)
        metrics = {k: 100 * v for k, v in result.items() if k != "per_sample"}
        each = result["per_sample"]
        for e, refs, pred, c, b, x in zip(examples, references, predictions, each["CIDEr"], each["BLEU-4"],
                                          each["exact_match"]):
            records.append({"image": _image_name(e), "source": e.source, "prediction": pred, "references": refs,
                            "CIDEr": 100 * c, "BLEU-4": 100 * b, "exact_match": 100 * x, **e.meta})
        return metrics, records
    result = vqa_accuracy(predictions, references)
    metrics = {"accuracy": 100 * result["accuracy"]}
    groups: dict = {f: defaultdict(list) for f in GROUP_FIELDS}
    for e, answers, pred, s in zip(examples, references, predictions, result["per_sample"]):
        question = e.question if e.task != "chat" else e.conversation[-2]["content"]
        records.append({"image": _image_name(e), "source": e.source, "question": question, "prediction": pred,
                        "answers": answers, "accuracy": 100 * s, **e.meta})
        for f in GROUP_FIELDS:
            if f in e.meta:
                groups[f][str(e.meta[f])].append(s)
    for f, by_value in groups.items():
        if by_value:
            metrics[f"per_{f}"] = {
                v: {"accuracy": 100 * sum(xs) / len(xs), "count": len(xs)} for v, xs in sorted(by_value.items())
            }
    return metrics, records


def main(argv: list[str] | None = None) -> int:
    """Entry point of `vlm eval`."""
    args = build_parser().parse_args(argv)
    if args.batch_size < 1:
        raise VLMError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.limit is not None and args.limit < 1:
        raise VLMError(f"--limit must be at least 1, got {args.limit}")
    if args.out and os.path.isdir(args.out):
        raise VLMError(f"--out {args.out}: is a folder; give a file name such as preds.jsonl")

    from vlm.data import load_examples

    # The data is read and checked before the (slow) model load: bad rows fail fast.
    examples = load_examples(
        args.data, task="caption" if args.task == "retrieval" else args.task, image_root=args.image_root,
        split=args.split, image_column=args.image_column, text_column=args.text_column,
        skip_bad_images=args.skip_bad_images,
    )
    if args.task == "retrieval":
        return evaluate_retrieval(args, examples)
    gen_kwargs = generation_kwargs(args.task, args)
    if args.task == "caption":
        items = caption_items(examples)
        samples, references = [e for e, _ in items], [refs for _, refs in items]
    elif args.task == "chat":
        samples, references = list(examples), chat_references(examples)
    else:
        samples, references = list(examples), [list(e.answers) for e in examples]
    if args.limit:
        samples, references = samples[: args.limit], references[: args.limit]

    from vlm.load_policy import load_from_args

    started = time.perf_counter()
    loaded = load_from_args(args)
    model, processor = loaded.model, loaded.processor
    predictions = predict(model, processor, samples, args.task, args.batch_size, gen_kwargs)
    metrics, records = score(args.task, samples, references, predictions)
    if args.out:
        _write_jsonl(Path(args.out), records)
    summary = {
        "task": args.task,
        "model": args.model or "demo",
        "data": args.data,
        "samples": len(samples),
        "skipped_bad_images": examples.skipped,
        "metrics": metrics,
        "generation": gen_kwargs,
        "predictions": args.out,
        "seconds": round(time.perf_counter() - started, 2),
    }
    print(json.dumps(summary, indent=2))
    return 0


def evaluate_retrieval(args: argparse.Namespace, examples) -> int:
    """`--task retrieval`: recall both ways (see `retrieval.py`), printed as the JSON summary."""
    from vlm.load_policy import load_from_args

    from .retrieval import retrieval_metrics

    if args.k_test < 1:
        raise VLMError(f"--k-test must be at least 1, got {args.k_test}")
    samples = list(examples)[: args.limit] if args.limit else list(examples)
    started = time.perf_counter()
    loaded = load_from_args(args)
    model, processor = loaded.model, loaded.processor
    if not model.config.has_image_text_heads or getattr(processor, "qformer_tokenizer", None) is None:
        raise VLMError(f"{args.model or 'the demo model'}: has no image-text (ITC/ITM) heads for --task retrieval")
    metrics = retrieval_metrics(model, processor, samples, k_test=args.k_test, batch_size=args.batch_size)
    summary = {"task": "retrieval", "model": args.model or "demo", "data": args.data, "samples": len(samples),
               "skipped_bad_images": examples.skipped, "metrics": metrics, "k_test": args.k_test,
               "seconds": round(time.perf_counter() - started, 2)}
    print(json.dumps(summary, indent=2))
    return 0


def _image_name(example) -> str:
    return example.image if isinstance(example.image, str) else example.source


def _write_jsonl(path: Path, records: list[dict]) -> None:
    """Write all lines to a temporary file, then rename: never a half-written predictions file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False, default=str) + "\n")
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
