"""What serving a LoRA unmerged costs: the demo's adapter on, against the same adapter merged.

The demo keeps its LoRA (r 16 on every projection of SmolLM2's 30 layers) unmerged so that
conversations without an image run the base LLM (`vlm.engine.adapters`); every request with an
image then pays the adapter's extra matmuls. This loads the default demo, merges a copy of it
(`merge_and_unload`, what `vlm export --merge-lora` writes), and times the engine's offline
`generate` on the same image questions with exactly `--new-tokens` tokens each (min = max, so EOS
cannot shorten a side). Runs alternate (unmerged, merged, unmerged, ...) and the medians are
compared, so machine noise hits both alike. Prints tokens/s, the ratio, and how many answers the
two agree on (greedy; merging changes fp32 rounding only).

    python bench/adapter.py [--batch-size 8] [--new-tokens 16] [--repeats 3] [--requests 16]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tiny import random_image

from vlm import load_pretrained
from vlm.engine import GenerationSettings, InferenceEngine, Request

QUESTIONS = ["what colour is the shape?", "What shape is it?", "Describe the image.", "Is it a circle?"]


def requests(processor, count: int, new_tokens: int) -> list[Request]:
    settings = GenerationSettings(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    out = []
    for i in range(count):
        messages = [{"role": "user", "content": "<image>\n" + QUESTIONS[i % len(QUESTIONS)]}]
        prompt = processor.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        out.append(Request(prompt, [random_image(i)], settings))
    return out


def timed(engine: InferenceEngine, batch: list[Request], batch_size: int) -> tuple[float, list[str]]:
    start = time.perf_counter()
    completions = engine.generate(batch, batch_size=batch_size)
    seconds = time.perf_counter() - start
    assert all(c.error is None for c in completions), [c.error for c in completions if c.error]
    return seconds, [c.text for c in completions]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default=None, help="an unmerged LoRA checkpoint (default: the demo)")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    unmerged, processor = load_pretrained(args.model, device="cpu")
    if not hasattr(unmerged, "merge_and_unload"):
        raise SystemExit(f"{args.model or 'the demo'} holds no unmerged LoRA adapter")
    merged = copy.deepcopy(unmerged).merge_and_unload()
    # The bench's random pictures are unlike the demo's training images: with novelty statistics the
    # unmerged side would answer its canned sentence (merging drops the statistics), so neither has them.
    unmerged.novelty = merged.novelty = None
    engines = {"unmerged": InferenceEngine(unmerged, processor), "merged": InferenceEngine(merged, processor)}
    batch = requests(processor, args.requests, args.new_tokens)
    for engine in engines.values():  # warm-up: first-call allocations, not the adapter, would show
        timed(engine, batch[: args.batch_size], args.batch_size)
    seconds: dict[str, list[float]] = {name: [] for name in engines}
    texts: dict[str, list[str]] = {}
    for _ in range(args.repeats):
        for name, engine in engines.items():
            took, texts[name] = timed(engine, batch, args.batch_size)
            seconds[name].append(took)
    tokens = args.requests * args.new_tokens
    rate = {name: tokens / statistics.median(s) for name, s in seconds.items()}
    print(f"torch threads {torch.get_num_threads()}; {args.requests} image requests x {args.new_tokens} tokens, "
          f"batch {args.batch_size}, median of {args.repeats}")
    for name in engines:
        print(f"{name:>9}: {rate[name]:7.1f} tokens/s  (runs: {', '.join(f'{s:.2f}s' for s in seconds[name])})")
    same = sum(a == b for a, b in zip(texts["unmerged"], texts["merged"]))
    print(f"unmerged / merged throughput: {rate['unmerged'] / rate['merged']:.2f}x; "
          f"answers equal on {same}/{args.requests}")


if __name__ == "__main__":
    main()
