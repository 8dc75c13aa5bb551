"""Throughput of `vlm serve` for 8 concurrent vs 8 sequential chat completions (continuous batching).

A real `vlm serve` subprocess on a random-weight, mid-size official BLIP-2 (OPT) checkpoint,
driven by the official `openai` client: each request asks about its own image, greedy, with
`max_tokens` new tokens. Sequential: one request after another. Concurrent: all at once from
threads. Every round uses images the server has not seen (a first turn: the vision tower runs for
each request); `--cached` reuses one set of images (follow-up turns: found in the feature cache).
Prints completion tokens/s of each (from the responses' `usage`), the ratio, and the p50/p95
latency of each mode, plus the machine's load average before the run.

    python bench/serve.py [--requests 8] [--max-tokens 32] [--repeats 2]
"""

from __future__ import annotations

import argparse
import base64
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "bench"), str(ROOT / "tests")]

import openai  # noqa: E402
from caption import mid_size_checkpoint  # noqa: E402
from server_process import ServerProcess  # noqa: E402
from tiny import random_image  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def ask(client: openai.OpenAI, model: str, image: str, max_tokens: int) -> tuple[float, int, str]:
    start = time.perf_counter()
    reply = client.chat.completions.create(
        model=model, temperature=0, max_tokens=max_tokens,
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                               {"type": "text", "text": "Describe the picture in detail."}]}],
    )
    return time.perf_counter() - start, reply.usage.completion_tokens, reply.choices[0].message.content


def run(client, model, images, max_tokens, concurrent: bool):
    start = time.perf_counter()
    if concurrent:
        with ThreadPoolExecutor(len(images)) as pool:
            results = list(pool.map(lambda im: ask(client, model, im, max_tokens), images))
    else:
        results = [ask(client, model, im, max_tokens) for im in images]
    wall = time.perf_counter() - start
    tokens = sum(r[1] for r in results)
    return tokens / wall, [r[0] for r in results], [r[2] for r in results]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2, help="rounds of (sequential, concurrent); the best of each")
    p.add_argument("--cached", action="store_true", help="the same images every round (cache hits after the first)")
    args = p.parse_args()
    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        checkpoint = mid_size_checkpoint(tmp / "blip2")
        seeds = iter(range(10**6))

        def new_images() -> list[str]:
            out = []
            for _ in range(args.requests):
                path = tmp / "image.png"
                random_image(next(seeds), (224, 224)).save(path)
                out.append("data:image/png;base64," + base64.b64encode(path.read_bytes()).decode())
            return out

        images = new_images()
        server = ServerProcess("serve", checkpoint, tmp / "serve.log", "--max-batch-size", str(args.requests),
                               ready="v1/models")
        try:
            client = openai.OpenAI(base_url=server.url + "v1", api_key="none", max_retries=0, timeout=600)
            model = client.models.list().data[0].id
            run(client, model, new_images()[:2], 4, concurrent=False)  # warm-up
            best = {}
            for _ in range(args.repeats):
                for concurrent in (False, True):
                    batch = images if args.cached else new_images()
                    rate, latencies, texts = run(client, model, batch, args.max_tokens, concurrent)
                    if concurrent not in best or rate > best[concurrent][0]:
                        best[concurrent] = (rate, latencies, texts)
        finally:
            server.stop()
    print(f"machine: {os.cpu_count()} CPUs, load average before the run {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"{args.requests} requests x {args.max_tokens} new tokens, greedy, mid-size random BLIP-2 OPT (CPU)")
    for concurrent, name in ((False, "sequential"), (True, "concurrent")):
        rate, latencies, _ = best[concurrent]
        print(f"  {name:<10} {rate:7.1f} completion tokens/s   latency p50 {statistics.median(latencies):5.2f}s"
              f"  p95 {percentile(latencies, 0.95):5.2f}s")
    print(f"  concurrent / sequential throughput: {best[True][0] / best[False][0]:.2f}x")
    if args.cached:
        print(f"  same replies in both modes: {best[True][2] == best[False][2]}")
    print("  images: " + ("cached (follow-up turns)" if args.cached else "new every round (first turns)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
