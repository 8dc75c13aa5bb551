"""Batched generation throughput of vlm vs transformers' Blip2ForConditionalGeneration.generate.

Same mid-size random-weight official BLIP-2 (OPT) checkpoint, same left-padded batch of prompts
of different lengths, same greedy settings. Runs alternate (ours, theirs, ours, ...) and the
median of each is compared, so machine noise hits both alike. Prints tokens/s and the ratio.

    python bench/generate.py [--batch-size 8] [--new-tokens 24] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import Blip2ForConditionalGeneration, Blip2Processor

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import tiny  # noqa: E402

from vlm import load_pretrained  # noqa: E402

IMAGE_SIZE = 112
PROMPTS = ["a photo of", "question: what colour is the shape? short answer:", "", "the quick brown fox"]


def mid_size_checkpoint(path: Path) -> Path:
    """A BLIP-2-shaped checkpoint big enough that Python overhead does not dominate."""
    return tiny.save_official_blip2(
        path, "opt", num_query_tokens=32, image_size=IMAGE_SIZE,
        vision=dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6, patch_size=14),
        qformer=dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
                     cross_attention_frequency=2),
        text={"hidden_size": 512, "word_embed_proj_dim": 512, "ffn_dim": 2048, "num_hidden_layers": 6},
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = mid_size_checkpoint(Path(tmp))
        ref_processor = Blip2Processor.from_pretrained(path)
        ref_processor.tokenizer.padding_side = "left"
        reference = Blip2ForConditionalGeneration.from_pretrained(path).eval()
        model, processor = load_pretrained(path, device="cpu")

    images = [tiny.random_image(i, (IMAGE_SIZE, IMAGE_SIZE)) for i in range(args.batch_size)]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.batch_size)]
    gen = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)

    # Preprocessing (the same image processor in both) is outside the timed region.
    our_batch = processor(images=images, text=prompts)
    their_batch = ref_processor(images=images, text=prompts, return_tensors="pt", padding=True)

    def ours() -> torch.Tensor:
        return model.generate(**our_batch, **gen)

    def theirs() -> torch.Tensor:
        return reference.generate(**their_batch, **gen)

    a, b = ours(), theirs()  # warm-up, and the outputs must agree
    assert processor.tokenizer.batch_decode(a[:, -args.new_tokens:]) == ref_processor.tokenizer.batch_decode(
        b[:, -args.new_tokens:]), "outputs differ"
    times = {"vlm": [], "transformers": []}
    for _ in range(args.repeats):
        for name, fn in (("vlm", ours), ("transformers", theirs)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    tokens = args.batch_size * args.new_tokens
    median = {k: statistics.median(v) for k, v in times.items()}
    for name, t in median.items():
        print(f"{name:>13}: {tokens / t:8.1f} new tokens/s  (median of {args.repeats}, {t:.3f} s per batch)")
    print(f"ratio vlm / transformers: {median['transformers'] / median['vlm']:.3f}  "
          f"(batch {args.batch_size}, {args.new_tokens} new tokens, greedy, CPU threads {torch.get_num_threads()})")


if __name__ == "__main__":
    main()
