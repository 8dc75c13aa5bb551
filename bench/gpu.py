"""Every GPU figure we want, from one command: chat, captioning and training at real model shapes.

    python bench/gpu.py --out bench/gpu-results.md        # one GPU, under 8 minutes
    python bench/gpu.py --smoke                           # the same code at tiny shapes on CPU (<3 min)

Random weights at the shapes users run (nothing here can reach a model hub):

- chat at 7B shape (ViT-g vision tower, 32 queries, Vicuna-7B-shaped Llama), bf16 and 4-bit NF4,
  through the inference engine: time to first token with a new image, decode tokens/s at batch 1,
  peak GPU memory, and the fraction of the memory-bandwidth limit decode reaches (LLM weight bytes
  read per token x tokens/s, over a device-to-device copy's bandwidth measured in the same run);
- `vlm caption` against transformers' `Blip2ForConditionalGeneration.generate` at OPT-2.7B shape in
  bf16, batch 32 and 64: images/s of each and the ratio (marginal: two sizes, so loading cancels);
- LoRA and QLoRA training at 7B shape (`vlm train`, bf16, gradient checkpointing): seconds per
  step and peak GPU memory.

Writes a markdown table (device, date, versions, command) to stdout and `--out`. Never edit its
numbers by hand: `bench/RESULTS.md` holds runs of this script as they printed.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def _import_from_checkout() -> None:
    """Run from a checkout that was never installed (the lent GPU machine builds nothing offline):
    `vlm.train` / `vlm.serve` / `vlm.configs` live in the top-level folders train/, serve/, configs/."""
    import vlm

    try:
        import vlm.train  # noqa: F401
    except ImportError:
        vlm.__path__.append(str(ROOT))


_import_from_checkout()

# (vision, qformer, llm) shapes. `full` is what users run; `smoke` keeps widths multiples of 64
# (bitsandbytes' CPU kernels need them) and runs on 2 CPU cores in seconds.
SHAPES = {
    "full": {
        "vision": dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16,
                       image_size=224, patch_size=14),
        "qformer": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                        cross_attention_frequency=2),
        "queries": 32,
        "llama": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, max_position_embeddings=2048),
        "opt": dict(hidden_size=2560, ffn_dim=10240, word_embed_proj_dim=2560, num_hidden_layers=32,
                    num_attention_heads=32, max_position_embeddings=2048),
        "caption_images": (64, 192), "new_tokens": 128, "train_steps": 6, "train_batch": 4,
    },
    "smoke": {
        "vision": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       image_size=32, patch_size=16),
        "qformer": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                        cross_attention_frequency=1),
        "queries": 4,
        "llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, max_position_embeddings=256),
        "opt": dict(hidden_size=64, ffn_dim=128, word_embed_proj_dim=64, num_hidden_layers=2, num_attention_heads=4,
                    max_position_embeddings=256),
        "caption_images": (4, 12), "new_tokens": 8, "train_steps": 2, "train_batch": 2,
    },
}


# -- checkpoints -------------------------------------------------------------------------------------
def build_checkpoint(path: Path, llm: str, shape: dict, device: str) -> Path:
    """An official-format `Blip2ForConditionalGeneration` with random bf16 weights, built on `device`."""
    from tiny import image_processor, make_tokenizer
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, LlamaConfig, OPTConfig

    tokenizer = make_tokenizer("opt" if llm == "opt" else "llama", chat=llm == "llama")
    size = shape["vision"]["image_size"]
    processor = Blip2Processor(image_processor(size), tokenizer, num_query_tokens=shape["queries"])
    common = dict(vocab_size=len(tokenizer), pad_token_id=0, bos_token_id=1, eos_token_id=2)
    text = OPTConfig(**common, **shape["opt"]) if llm == "opt" else LlamaConfig(**common, **shape["llama"])
    config = Blip2Config(vision_config=shape["vision"], qformer_config={**shape["qformer"], "vocab_size": 200},
                         text_config=text.to_dict(), num_query_tokens=shape["queries"],
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # random init straight in bf16, on the GPU: seconds, not minutes
    try:
        with torch.device(device):
            model = Blip2ForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    del model
    return path


def images(folder: Path, n: int, size: tuple[int, int] = (640, 480)) -> list[Path]:
    from tiny import random_image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        paths.append(folder / f"{i}.jpg")
        random_image(i, size).save(paths[-1], quality=90)
    return paths


# -- measurement helpers -------------------------------------------------------------------------------
def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None


def copy_bandwidth(device: str) -> float:
    """Bytes/s of a device-to-device copy (read + write), the memory-bandwidth limit decode is held to."""
    n = (2**30 if device.startswith("cuda") else 2**26) // 2
    a = torch.empty(n, dtype=torch.bfloat16, device=device)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    sync(device)
    start = time.perf_counter()
    for _ in range(10):
        b.copy_(a)
    sync(device)
    return 2 * a.numel() * a.element_size() * 10 / (time.perf_counter() - start)


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes a forward pass reads: parameters and buffers as stored (4-bit weights packed)."""
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


# -- the three benchmarks ------------------------------------------------------------------------------
def bench_chat(checkpoint: Path, quantization: str | None, device: str, shape: dict, bandwidth: float) -> dict:
    """TTFT (new image) and batch-1 decode speed through the engine's streaming path."""
    from PIL import Image

    from vlm import load_pretrained
    from vlm.engine import GenerationSettings, InferenceEngine, Request

    reset_peak(device)
    model, processor = load_pretrained(str(checkpoint), quantization=quantization, device=device,
                                       dtype=torch.bfloat16)
    engine = InferenceEngine(model, processor)
    n = shape["new_tokens"]
    settings = GenerationSettings(max_new_tokens=n, min_new_tokens=n)  # exactly n tokens
    prompt = processor.format_chat([{"role": "user", "content": [{"type": "image"},
                                                                 {"type": "text", "text": "Describe the image."}]}])
    pictures = images(checkpoint.parent / "chat-images", 4, (320, 240))
    runs = []
    for path in pictures:  # the first run warms up; every run has an image not seen before
        stream = engine.submit(Request(prompt, [Image.open(path).convert("RGB")], settings))
        start = time.perf_counter()
        first = None
        for _ in stream:
            first = first or time.perf_counter()
        end = time.perf_counter()
        runs.append((first - start, (stream.completion.completion_tokens - 1) / (end - first)))
    ttft = sorted(r[0] for r in runs[1:])[len(runs[1:]) // 2]
    tps = sorted(r[1] for r in runs[1:])[len(runs[1:]) // 2]
    llm_bytes = weight_bytes(model.language_model)
    engine.close()
    result = {"ttft_ms": 1000 * ttft, "decode_tokens_per_s": tps, "peak_gib": peak_gib(device),
              "llm_weight_gib": llm_bytes / 2**30, "bandwidth_fraction": llm_bytes * tps / bandwidth}
    del model, engine
    return result


def bench_caption(checkpoint: Path, device: str, shape: dict, batch: int, tmp: Path) -> dict:
    """`vlm caption` vs the transformers reference: marginal images/s over two input sizes."""
    from PIL import Image
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    from vlm.serve.caption import main as caption_main

    small, large = shape["caption_images"]
    pictures = images(tmp / "caption-images", large)
    new_tokens = 20

    def ours(n: int) -> float:
        listing = tmp / f"list-{n}.txt"
        listing.write_text("".join(f"{p}\n" for p in pictures[:n]))
        out = tmp / f"captions-{batch}-{n}.jsonl"
        start = time.perf_counter()
        status = caption_main([str(listing), "--out", str(out), "--model", str(checkpoint), "--batch-size", str(batch),
                               "--max-new-tokens", str(new_tokens), "--dtype", "bfloat16", "--device", device,
                               "--no-progress", "--overwrite", "--prompt", "a photo of"])
        assert status == 0, f"vlm caption exited {status}"
        return time.perf_counter() - start

    model = Blip2ForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.bfloat16).to(device).eval()
    processor = Blip2Processor.from_pretrained(checkpoint)
    processor.tokenizer.padding_side = "left"

    def reference(n: int) -> float:
        start = time.perf_counter()
        for i in range(0, n, batch):
            chunk = [Image.open(p).convert("RGB") for p in pictures[i:i + batch]]
            inputs = processor(images=chunk, text=["a photo of"] * len(chunk), return_tensors="pt", padding=True)
            inputs = inputs.to(device)
            inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
            with torch.inference_mode():
                model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
        sync(device)
        return time.perf_counter() - start

    reference(min(batch, small))  # warm-up
    ref_rate = (large - small) / (reference(large) - reference(small))
    model = None  # the reference's weights leave the GPU before ours load
    reset_peak(device)
    ours_rate = (large - small) / (ours(large) - ours(small))
    return {"batch": batch, "vlm_images_per_s": ours_rate, "transformers_images_per_s": ref_rate,
            "ratio": ours_rate / ref_rate}


def bench_train(checkpoint: Path, recipe: str, device: str, shape: dict, tmp: Path) -> dict:
    """Seconds per optimizer step (after the first) and peak GPU memory of `vlm train`."""
    from transformers import TrainerCallback

    from vlm.train.config import load_config
    from vlm.train.run import train

    folder = tmp / f"train-{recipe}"
    pictures = images(folder, 8, (320, 240))
    data = folder / "train.jsonl"
    data.write_text("".join(json.dumps({"image": str(p), "text": f"a photo of shape number {i}"}) + "\n"
                            for i, p in enumerate(pictures)))
    steps = shape["train_steps"]
    times: list[float] = []

    class StepTimes(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            sync(device)
            times.append(time.perf_counter())

    precision = "bf16" if device.startswith("cuda") else "fp32"
    config = load_config(recipe, [f"model={checkpoint}", f"data.train={data}", f"output_dir={folder / 'out'}",
                                  f"max_steps={steps}", f"batch_size={shape['train_batch']}", "resume=none",
                                  "report_to=none", f"precision={precision}", "gradient_checkpointing=true",
                                  "save_steps=100000", "data.num_workers=0", "vision_cache_gb=0", "logging_steps=1"])
    reset_peak(device)
    train(config, callbacks=[StepTimes()])
    per_step = (times[-1] - times[0]) / (len(times) - 1)
    return {"recipe": recipe, "seconds_per_step": per_step, "peak_gib": peak_gib(device),
            "batch": shape["train_batch"]}


# -- report --------------------------------------------------------------------------------------------
def versions() -> str:
    names = ("torch", "transformers", "peft", "accelerate", "bitsandbytes")
    found = []
    for name in names:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{name} -")
    return ", ".join(found)


def fmt(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def report(results: dict, device: str, command: str) -> str:
    name = torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "CPU"
    lines = [f"### {results['mode']} run, {datetime.date.today().isoformat()}, {name}", "",
             f"`{command}` · {versions()} · copy bandwidth {results['bandwidth'] / 1e9:.0f} GB/s", "",
             "| chat (7B shape) | TTFT ms (new image) | decode tokens/s | peak GiB | LLM weights GiB | "
             "fraction of bandwidth limit |", "| --- | --- | --- | --- | --- | --- |"]
    for label, r in results["chat"].items():
        lines.append(f"| {label} | {fmt(r['ttft_ms'], 0)} | {fmt(r['decode_tokens_per_s'], 1)} | {fmt(r['peak_gib'])} | "
                     f"{fmt(r['llm_weight_gib'])} | {fmt(r['bandwidth_fraction'])} |")
    lines += ["", "| caption (OPT-2.7B shape, bf16) | vlm images/s | transformers images/s | ratio |",
              "| --- | --- | --- | --- |"]
    for r in results["caption"]:
        lines.append(f"| batch {r['batch']} | {fmt(r['vlm_images_per_s'], 1)} | "
                     f"{fmt(r['transformers_images_per_s'], 1)} | {fmt(r['ratio'])} |")
    lines += ["", "| training (7B shape) | batch | s/step | peak GiB |", "| --- | --- | --- | --- |"]
    for r in results["train"]:
        lines.append(f"| {r['recipe']} | {r['batch']} | {fmt(r['seconds_per_step'])} | {fmt(r['peak_gib'])} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU: checks the code, measures nothing useful")
    p.add_argument("--out", type=Path, help="also write the markdown table here")
    p.add_argument("--device", default=None, help="default: cuda (cpu with --smoke)")
    p.add_argument("--skip", nargs="*", default=[], choices=["chat", "caption", "train"])
    args = p.parse_args(argv)
    device = args.device or ("cpu" if args.smoke else "cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("error: no CUDA device (run with --smoke to check the script on CPU)", file=sys.stderr)
        return 1
    shape = SHAPES["smoke" if args.smoke else "full"]
    quantize = importlib.util.find_spec("bitsandbytes") is not None
    results = {"mode": "smoke (tiny shapes)" if args.smoke else "full (real shapes)", "chat": {}, "caption": [],
               "train": [], "bandwidth": copy_bandwidth(device)}
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="vlm-gpu-bench-"))
    try:
        if "chat" not in args.skip or "train" not in args.skip:
            llama = build_checkpoint(tmp / "llama-7b", "llama", shape, device)
            print(f"built the 7B-shaped checkpoint in {time.perf_counter() - started:.0f}s", flush=True)
        if "chat" not in args.skip:
            for label, quantization in (("bf16", None), ("4-bit NF4", "4bit")):
                if quantization and not quantize:
                    continue
                results["chat"][label] = bench_chat(llama, quantization, device, shape, results["bandwidth"])
                print(f"chat {label}: {results['chat'][label]}", flush=True)
        if "train" not in args.skip:
            for recipe in ("lora", "qlora") if quantize else ("lora",):
                results["train"].append(bench_train(llama, recipe, device, shape, tmp))
                print(f"train: {results['train'][-1]}", flush=True)
        if "caption" not in args.skip:
            shutil.rmtree(tmp / "llama-7b", ignore_errors=True)
            opt = build_checkpoint(tmp / "opt-2.7b", "opt", shape, device)
            for batch in (32, 64) if not args.smoke else (2, 4):
                results["caption"].append(bench_caption(opt, device, shape, batch, tmp))
                print(f"caption: {results['caption'][-1]}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    command = "python bench/gpu.py" + (" --smoke" if args.smoke else "")
    table = report(results, device, command) + f"\n({time.perf_counter() - started:.0f} s in all)\n"
    print(table)
    if args.out:
        args.out.write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
