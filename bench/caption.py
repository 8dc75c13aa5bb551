"""Throughput of `vlm caption` vs the transformers reference pipeline and a one-at-a-time loop.

All three caption the same JPEGs read from disk with the same random-weight, mid-size official
BLIP-2 (OPT) checkpoint and the same greedy settings:

- ours:      `vlm caption LIST --out FILE` (in this process: `serve.caption.main`);
- reference: `Blip2Processor` (left padding) + `Blip2ForConditionalGeneration.generate`, batched;
- loop:      the reference model, one image per call.

Throughput is marginal: (N_large - N_small) / (time(N_large) - time(N_small)), so model loading
and start-up cancel. Prints images/s, the ratios, the captions' agreement, and where the time
goes in one batch (decode, preprocessing, vision + Q-Former, generation).

    python bench/caption.py [--small 32] [--large 256] [--batch-size 16] [--new-tokens 20] [--workers N]

With --ray it measures `vlm caption --ray` instead (a local Ray instance, one actor per CPU, one
model copy each, chunks of --batch-size images) against one `vlm caption` process on the same
images: the ratio of their marginal images/s (Ray's start-up and the actors' model loading
cancel like the model loading above), and whether the rows are identical.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import Blip2ForConditionalGeneration, Blip2Processor

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
import tiny  # noqa: E402

from vlm.serve.caption import main as caption_main  # noqa: E402
from vlm.preprocess import make_preprocess  # noqa: E402

IMAGE_SIZE = 224


def mid_size_checkpoint(path: Path) -> Path:
    """Official-format BLIP-2: ViT 384x6 at 224px/16, Q-Former 256x4 with 32 queries, OPT 512x6."""
    return tiny.save_official_blip2(
        path, "opt", num_query_tokens=32, image_size=IMAGE_SIZE,
        vision=dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6, patch_size=16),
        qformer=dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
                     cross_attention_frequency=2),
        text={"hidden_size": 512, "word_embed_proj_dim": 512, "ffn_dim": 2048, "num_hidden_layers": 6,
              "num_attention_heads": 8},
    )


def make_images(folder: Path, n: int) -> list[str]:
    """n photo-sized (640x480) JPEGs: smooth gradients plus noise, so they decode like photos."""
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:480, 0:640]
    paths = []
    for i in range(n):
        rng = np.random.default_rng(i)
        base = np.stack([(xx * (i % 7 + 1) + yy) % 256, (yy * 2 + i * 9) % 256, (xx + yy * (i % 3)) % 256], -1)
        noisy = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        path = folder / f"photo_{i:04d}.jpg"
        Image.fromarray(noisy).save(path, quality=90)
        paths.append(str(path))
    return paths


def run_ours(model_dir: Path, paths: list[str], work: Path, args) -> tuple[float, list[str]]:
    listing = work / f"list{len(paths)}.txt"
    listing.write_text("\n".join(paths) + "\n")
    out = work / f"ours{len(paths)}.jsonl"
    start = time.perf_counter()
    code = caption_main([str(listing), "--out", str(out), "--model", str(model_dir), "--batch-size", str(args.batch_size),
                         "--max-new-tokens", str(args.new_tokens), "--no-progress", "--overwrite",
                         *(["--num-workers", str(args.workers)] if args.workers is not None else [])])
    seconds = time.perf_counter() - start
    assert code == 0
    return seconds, [json.loads(line)["caption"] for line in out.read_text().splitlines()]


def run_ray(model_dir: Path, paths: list[str], work: Path, args) -> list[str]:
    """`vlm caption LIST --out FOLDER --ray` in this process: its rows as sorted JSON lines."""
    listing = work / f"list{len(paths)}.txt"
    listing.write_text("\n".join(paths) + "\n")
    out = work / f"ray{len(paths)}"
    code = caption_main([str(listing), "--out", str(out), "--model", str(model_dir), "--batch-size", str(args.batch_size),
                         "--max-new-tokens", str(args.new_tokens), "--no-progress", "--overwrite",
                         "--shard-size", str(args.batch_size), "--ray"])
    assert code == 0
    return sorted(line for shard in out.glob("part-*.jsonl") for line in shard.read_text().splitlines())


def compare_ray(model_dir: Path, paths: list[str], work: Path, args) -> None:
    """One `vlm caption` process against `vlm caption --ray` on the same images (marginal images/s)."""
    def ours(p: list[str]) -> list[str]:
        run_ours(model_dir, p, work, args)
        return sorted((work / f"ours{len(p)}.jsonl").read_text().splitlines())

    rates, rows = {}, {}
    for name, fn in [("vlm caption", ours), ("vlm caption --ray", lambda p: run_ray(model_dir, p, work, args))]:
        times = []
        for n in (args.small, args.large):
            start = time.perf_counter()
            rows[name] = fn(paths[:n])
            times.append(time.perf_counter() - start)
        rates[name] = (args.large - args.small) / (times[1] - times[0])
        print(f"{name:<22} {times[0]:7.1f}s @ {args.small:<4} {times[1]:7.1f}s @ {args.large:<4} "
              f"marginal {rates[name]:6.2f} images/s", flush=True)
    print(f"\nratio --ray (local actors) vs one process: {rates['vlm caption --ray'] / rates['vlm caption']:.2f}x")
    same = rows["vlm caption"] == rows["vlm caption --ray"]
    print(f"rows identical: {same} ({len(rows['vlm caption --ray'])} rows)")


def run_reference(model_dir: Path, paths: list[str], batch_size: int, new_tokens: int) -> tuple[float, list[str]]:
    start = time.perf_counter()
    model = Blip2ForConditionalGeneration.from_pretrained(model_dir).eval()
    processor = Blip2Processor.from_pretrained(model_dir)
    processor.tokenizer.padding_side = "left"
    captions = []
    for i in range(0, len(paths), batch_size):
        images = [Image.open(p).convert("RGB") for p in paths[i:i + batch_size]]
        inputs = processor(images=images, text=[""] * len(images), padding=True, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
        new = out[:, inputs["input_ids"].shape[1]:]
        captions += [t.strip() for t in processor.batch_decode(new, skip_special_tokens=True)]
    return time.perf_counter() - start, captions


def stage_times(model_dir: Path, paths: list[str], batch_size: int, new_tokens: int) -> dict[str, float]:
    """Seconds per image of each stage, measured on one batch with our model."""
    from vlm import load_pretrained

    model, processor = load_pretrained(str(model_dir), device="cpu")
    batch = paths[:batch_size]
    times = {}
    t = time.perf_counter()
    images = [Image.open(p).convert("RGB") for p in batch]
    times["decode (PIL)"] = time.perf_counter() - t
    t = time.perf_counter()
    processor.image_processor(images, return_tensors="pt")
    times["preprocess, transformers PIL path"] = time.perf_counter() - t
    fast = make_preprocess(processor.image_processor)
    t = time.perf_counter()
    pixels = torch.stack([fast(im) for im in images])
    times[f"preprocess, ours ({type(fast).__name__})"] = time.perf_counter() - t
    enc = processor(images=images, text=[""] * len(images))
    with torch.inference_mode():
        t = time.perf_counter()
        features = model.get_vision_features(pixels)
        times["vision tower"] = time.perf_counter() - t
        t = time.perf_counter()
        image_features = model.get_image_features(vision_features=features)
        times["Q-Former + projection"] = time.perf_counter() - t
        t = time.perf_counter()
        model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], image_features=image_features,
                       max_new_tokens=new_tokens, do_sample=False)
        times[f"LLM generate ({new_tokens} tokens)"] = time.perf_counter() - t
    return {k: v / len(batch) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=32)
    parser.add_argument("--large", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=20)
    parser.add_argument("--workers", type=int, default=None, help="vlm caption --num-workers (default: its own)")
    parser.add_argument("--skip-loop", action="store_true", help="do not run the slow one-at-a-time loop")
    parser.add_argument("--ray", action="store_true", help="vlm caption --ray (local actors) against one process")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = mid_size_checkpoint(work / "model")
        paths = make_images(work / "images", args.large)
        print(f"torch threads {torch.get_num_threads()}, CPUs {os.cpu_count()}, batch {args.batch_size}, "
              f"{args.new_tokens} new tokens, N = {args.small} / {args.large}", flush=True)
        if args.ray:
            compare_ray(model_dir, paths, work, args)
            return

        results, captions = {}, {}
        for name, fn in [
            ("vlm caption", lambda p: run_ours(model_dir, p, work, args)),
            ("reference (batched)", lambda p: run_reference(model_dir, p, args.batch_size, args.new_tokens)),
            ("loop (1 at a time)", lambda p: run_reference(model_dir, p, 1, args.new_tokens)),
        ]:
            if name.startswith("loop") and args.skip_loop:
                continue
            t_small, caps_small = fn(paths[: args.small])
            t_large, caps_large = fn(paths)
            rate = (args.large - args.small) / (t_large - t_small)
            results[name], captions[name] = rate, caps_large
            print(f"{name:<22} {t_small:7.1f}s @ {args.small:<4} {t_large:7.1f}s @ {args.large:<4} "
                  f"marginal {rate:6.2f} images/s", flush=True)

        ours = results["vlm caption"]
        print(f"\nratio vs reference: {ours / results['reference (batched)']:.2f}x")
        if "loop (1 at a time)" in results:
            print(f"ratio vs loop:      {ours / results['loop (1 at a time)']:.2f}x")
        for name, caps in captions.items():
            if name != "vlm caption":
                same = sum(a == b for a, b in zip(captions["vlm caption"], caps))
                print(f"captions identical to {name}: {same}/{len(caps)}")

        print("\nwhere the time goes (seconds per image, one batch, this process):")
        for stage, seconds in stage_times(model_dir, paths, args.batch_size, args.new_tokens).items():
            print(f"  {stage:<40} {seconds * 1000:8.1f} ms")


if __name__ == "__main__":
    main()
