"""Throughput of `vlm serve` for 8 concurrent vs 8 sequential chat completions (continuous batching).

A real `vlm serve` subprocess on a random-weight, mid-size official BLIP-2 (OPT) checkpoint,
driven by the official `openai` client: each request asks about its own image, greedy, with
`max_tokens` new tokens. Sequential: one request after another. Concurrent: all at once from
threads. Every round uses images the server has not seen (a first turn: the vision tower runs for
each request); `--cached` reuses one set of images (follow-up turns: found in the feature cache).
Prints completion tokens/s of each (from the responses' `usage`), the ratio, and the p50/p95
latency of each mode, plus the machine's load average before the run.

`--adapters 2`: several fine-tunes on one base instead. Two LoRA outputs of `vlm train` (one
step each on the checkpoint) are served by one `vlm serve --adapter ...`, and the concurrent
requests split over them (decoded together, each row through its own LoRA); the reference is the same
number of concurrent requests on one of them merged into its base (`vlm export --merge-lora`).

    python bench/serve.py [--requests 8] [--max-tokens 32] [--repeats 3]
    python bench/serve.py --adapters 2 --requests 16
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
    p.add_argument("--repeats", type=int, default=3, help="rounds of (sequential, concurrent); the best of each")
    p.add_argument("--cached", action="store_true", help="the same images every round (cache hits after the first)")
    p.add_argument("--adapters", type=int, default=0, help="N fine-tunes on one base against one merged model")
    args = p.parse_args()
    if args.adapters:
        return adapters_main(args)
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


def train_adapters(checkpoint: Path, tmp: Path, n: int) -> list[Path]:
    """`n` LoRA outputs of `vlm train` (one step on two pictures each: what is served, not what was learnt)."""
    from vlm.cli import main as vlm_main

    outputs = []
    for k in range(n):
        folder = tmp / f"adapter-{k}"
        folder.mkdir()
        rows = []
        for i in range(2):
            random_image(100 * k + i, (224, 224)).save(folder / f"{i}.png")
            rows.append(f'{{"image": "{i}.png", "text": "picture {k} {i}"}}\n')
        (folder / "rows.jsonl").write_text("".join(rows))
        assert vlm_main(["train", "lora", f"model={checkpoint}", f"data.train={folder / 'rows.jsonl'}",
                         f"output_dir={folder / 'out'}", "max_steps=1", "batch_size=2", "grad_accum=1",
                         "report_to=none", "data.num_workers=0", "novelty_images=0"]) == 0
        outputs.append(folder / "out")
    return outputs


def adapters_main(args) -> int:
    """Concurrent requests split over `args.adapters` fine-tunes vs the same on one merged model."""
    from vlm.cli import main as vlm_main

    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        checkpoint = mid_size_checkpoint(tmp / "blip2")
        adapters = train_adapters(checkpoint, tmp, args.adapters)
        assert vlm_main(["export", str(adapters[0]), "--merge-lora", "--output-dir", str(tmp / "merged")]) == 0
        images = []
        for i in range(args.requests):
            random_image(10_000 + i, (224, 224)).save(tmp / "image.png")
            images.append("data:image/png;base64," + base64.b64encode((tmp / "image.png").read_bytes()).decode())
        flags = [f for k, a in enumerate(adapters) for f in ("--adapter", f"a{k}={a}")]
        rates = {}
        for label, model_dir, extra, names in (
            ("one merged model", tmp / "merged", [], None),
            (f"{args.adapters} adapters on one base", checkpoint, flags, [f"a{k}" for k in range(args.adapters)]),
        ):
            server = ServerProcess("serve", model_dir, tmp / "serve.log", "--max-batch-size", str(args.requests),
                                   "--served-model-name", "m", *extra, ready="v1/models")
            try:
                client = openai.OpenAI(base_url=server.url + "v1", api_key="none", max_retries=0, timeout=600)
                models = names or ["m"]
                run_split(client, models, images[:2], 4)  # warm-up
                rates[label] = max(run_split(client, models, images, args.max_tokens) for _ in range(args.repeats))
            finally:
                server.stop()
    print(f"machine: {os.cpu_count()} CPUs, load average before the run {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"{args.requests} concurrent requests x {args.max_tokens} new tokens, greedy, mid-size random BLIP-2 OPT")
    for label, rate in rates.items():
        print(f"  {label:<28} {rate:7.1f} completion tokens/s")
    merged, split = rates.values()
    print(f"  adapters / merged throughput: {split / merged:.2f}x")
    return 0


def run_split(client, models: list[str], images: list[str], max_tokens: int) -> float:
    """Completion tokens/s of all `images` asked at once, request i of model `models[i % len(models)]`."""
    start = time.perf_counter()
    with ThreadPoolExecutor(len(images)) as pool:
        results = list(pool.map(lambda job: ask(client, models[job[0] % len(models)], job[1], max_tokens),
                                enumerate(images)))
    return sum(r[1] for r in results) / (time.perf_counter() - start)


if __name__ == "__main__":
    sys.exit(main())
