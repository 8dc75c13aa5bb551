"""Every GPU figure we want, from one command: chat, concurrent streams, training and captioning at
real model shapes, each against what a user would otherwise run.

    python bench/gpu.py --out bench/gpu-results.md        # one GPU, inside --budget-s (500 s)
    python bench/gpu.py --smoke                           # the same code at tiny shapes on CPU (<1 min)

Random weights at the shapes users run (nothing here can reach a model hub), so speeds and memory
are real and no output is meaningful: no quality figure can come from this script.

- chat at 7B shape (ViT-g vision tower, 32 queries, Vicuna-7B-shaped Llama with its 32,000-token
  vocabulary), bf16 and 4-bit NF4, through the inference engine and through transformers' own
  `Blip2ForConditionalGeneration.generate` on the same checkpoint: time to first token (a 1-token
  request with a new image, from before `submit` to its completion), decode tokens/s
  ((128 - 1) / (T(128 tokens) - T(1 token))), peak GPU memory, and the fraction of the
  memory-bandwidth limit decode reaches (LLM weight bytes read per token x tokens/s, over a
  device-to-device copy's bandwidth measured in the same run);
- 16 concurrent streams through the engine against the same 16 requests one after another;
- LoRA and QLoRA training at 7B shape (`vlm train`'s presets, bf16, gradient checkpointing):
  samples and tokens per optimizer step, seconds per step, peak GPU memory;
- `vlm caption` against transformers' `generate` at OPT-2.7B shape in bf16, batch 32 and 64.

The most important benchmarks run first. Each runs in its own try/except: a failure is recorded
in its row and the run goes on; one that would start after `--budget-s` is recorded as skipped.
`--out` is rewritten after each benchmark (a complete, valid table at every moment, so a run
killed at the device's time limit still reports what it measured). Before each benchmark the
garbage collector runs and the allocated memory is printed; after it, the table says whether the
models it loaded were freed as soon as it returned (no collector run needed).

A preflight imports transformers, peft, pydantic and bitsandbytes and quantizes a small tensor to
4-bit on the device; when that fails, the 4-bit rows are skipped with its reason.
`VLM_BENCH_FAIL=ID[,ID]` (tests only) makes the benchmarks with those ids (or id prefixes) fail on
purpose after loading their model.

Never edit its numbers by hand: `bench/RESULTS.md` holds runs of this script as they printed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import importlib
import importlib.metadata
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
import weakref
from collections.abc import Callable
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
# (bitsandbytes' CPU kernels need them) and runs on 2 CPU cores in seconds. Both use the real
# vocabularies: the embedding and output layers of a 7B Llama are 32000 x 4096 each.
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
        "caption_images": (64, 192), "caption_batches": (32, 64), "new_tokens": 128, "stream_tokens": 64,
        "train_steps": 6, "train_batch": 4,
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
        "caption_images": (4, 12), "caption_batches": (2, 4), "new_tokens": 8, "stream_tokens": 4,
        "train_steps": 2, "train_batch": 2,
    },
}
VOCAB = {"llama": 32000, "opt": 50272}  # Llama-2/Vicuna-7B's and OPT's vocabulary sizes
STREAMS = 16
QUESTION = "Describe the image."
FAIL_ENV = "VLM_BENCH_FAIL"


# -- checkpoints -------------------------------------------------------------------------------------
def make_tokenizer(vocab_size: int, style: str):
    """A word-level tokenizer with exactly `vocab_size` entries, built offline: the test corpus's
    words, then generated filler words. `opt` adds `</s>` as BOS (like OPT's), `llama` adds `<s>`
    and has a chat template."""
    from tiny import CHAT_TEMPLATE, CORPUS
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>", "<image>"]
    split = pre_tokenizers.Whitespace()
    words = {w for line in [*CORPUS, QUESTION, "user assistant system"] for w, _ in split.pre_tokenize_str(line)}
    tokens = specials + sorted(words)
    tokens += [f"w{i}" for i in range(vocab_size - len(tokens))]
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    tok.pre_tokenizer = split
    tok.add_special_tokens(specials)  # matched whole in text, ids unchanged: the size stays exact
    bos = "</s>" if style == "opt" else "<s>"
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    if style == "llama":
        fast.chat_template = CHAT_TEMPLATE
    assert len(fast) == vocab_size, (len(fast), vocab_size)
    return fast


def build_checkpoint(path: Path, llm: str, shape: dict, device: str) -> Path:
    """An official-format `Blip2ForConditionalGeneration` with random bf16 weights, built on `device`."""
    from tiny import image_processor
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, LlamaConfig, OPTConfig

    tokenizer = make_tokenizer(VOCAB[llm], llm)
    size = shape["vision"]["image_size"]
    processor = Blip2Processor(image_processor(size), tokenizer, num_query_tokens=shape["queries"])
    common = dict(vocab_size=len(tokenizer), pad_token_id=0, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id)
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


def images(folder: Path, n: int, size: tuple[int, int] = (640, 480), start: int = 0) -> list[Path]:
    """`n` JPEG files of random pictures (`start` seeds the first: distinct calls, distinct images)."""
    from tiny import random_image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + n):
        paths.append(folder / f"{i}.jpg")
        if not paths[-1].exists():
            random_image(i, size).save(paths[-1], quality=90)
    return paths


def opened(paths: list[Path]) -> list:
    """The pictures decoded to RGB (before any timer starts)."""
    from PIL import Image

    return [Image.open(p).convert("RGB") for p in paths]


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


def allocated(device: str) -> str:
    """The device memory tensors hold now, for the log."""
    if not device.startswith("cuda"):
        return "n/a on CPU"
    gib = 2**30
    return f"{torch.cuda.memory_allocated() / gib:.2f} GiB allocated, {torch.cuda.memory_reserved() / gib:.2f} reserved"


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


def decode_figures(timed: Callable, pictures: list, n: int) -> tuple[float, float]:
    """(TTFT s, decode tokens/s), medians over the pairs after the first (a warm-up): each pair is a
    1-token and an n-token request, each with a picture not seen before. `timed(image, tokens)`
    returns seconds from before the request to its last token."""
    runs = []
    for one, many in zip(pictures[0::2], pictures[1::2]):
        t1 = timed(one, 1)
        runs.append((t1, (n - 1) / (timed(many, n) - t1)))
    return statistics.median(r[0] for r in runs[1:]), statistics.median(r[1] for r in runs[1:])


def chat_row(ttft: float, tps: float, llm: torch.nn.Module, device: str, bandwidth: float) -> dict:
    llm_bytes = weight_bytes(llm)
    return {"ttft_ms": 1000 * ttft, "tokens_per_s": tps, "peak_gib": peak_gib(device),
            "llm_gib": llm_bytes / 2**30, "bandwidth_fraction": llm_bytes * tps / bandwidth}


def chat_prompt(processor) -> str:
    """The chat request every chat benchmark sends: one image, then `QUESTION`."""
    return processor.format_chat([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}])


def exact(n: int):
    from vlm.engine import GenerationSettings

    return GenerationSettings(max_new_tokens=n, min_new_tokens=n)  # exactly n tokens, EOS or not


def fail_on_purpose(bench_id: str) -> None:
    """Raise when `VLM_BENCH_FAIL` names this benchmark (tests: a failure must not end the run)."""
    names = [n.strip() for n in os.environ.get(FAIL_ENV, "").split(",") if n.strip()]
    if any(bench_id == n or bench_id.startswith(n + "-") for n in names):
        raise RuntimeError(f"{bench_id} failed on purpose ({FAIL_ENV})")


# -- shared state --------------------------------------------------------------------------------------
@dataclasses.dataclass
class Context:
    """What every benchmark gets: the device, shapes, a scratch folder, the checkpoints (built on
    first use) and weak references to every model it loads (the freed-at-del check)."""

    device: str
    shape: dict
    tmp: Path
    bandwidth: float
    built: dict = dataclasses.field(default_factory=dict)
    watched: list = dataclasses.field(default_factory=list)
    picture_count: int = 0

    def checkpoint(self, llm: str) -> Path:
        if llm not in self.built:
            start = time.perf_counter()
            self.built[llm] = build_checkpoint(self.tmp / f"{llm}-checkpoint", llm, self.shape, self.device)
            print(f"built the {llm} checkpoint in {time.perf_counter() - start:.0f}s", flush=True)
        return self.built[llm]

    def watch(self, model) -> None:
        if not any(ref() is model for ref in self.watched):  # loaded through two watched paths
            self.watched.append(weakref.ref(model))

    def alive(self) -> int:
        return sum(ref() is not None for ref in self.watched)

    def new_pictures(self, n: int, size: tuple[int, int] = (320, 240)) -> list:
        """`n` decoded pictures no earlier call returned (so none is in an engine's feature cache)."""
        paths = images(self.tmp / "pictures", n, size, start=self.picture_count)
        self.picture_count += n
        return opened(paths)

    def load(self, llm: str, quantization: str | None):
        from vlm import load_pretrained

        model, processor = load_pretrained(str(self.checkpoint(llm)), quantization=quantization, device=self.device,
                                           dtype=torch.bfloat16)
        self.watch(model)
        return model, processor


@contextlib.contextmanager
def watching_loads(ctx: Context):
    """Every `vlm.loading.load_pretrained` call (`vlm caption` makes its own) is watched too."""
    try:
        from vlm import loading
    except Exception:  # noqa: BLE001 - each benchmark then records the import error itself
        traceback.print_exc()
        yield
        return
    original = loading.load_pretrained

    def load_and_watch(*args, **kwargs):
        model, processor = original(*args, **kwargs)
        ctx.watch(model)
        return model, processor

    loading.load_pretrained = load_and_watch
    try:
        yield
    finally:
        loading.load_pretrained = original


# -- chat ----------------------------------------------------------------------------------------------
def bench_chat(ctx: Context, bench_id: str, quantization: str | None) -> dict:
    """TTFT and decode speed of one request at a time through the engine (`vlm chat`'s path)."""
    from vlm.engine import InferenceEngine, Request

    reset_peak(ctx.device)
    model, processor = ctx.load("llama", quantization)
    fail_on_purpose(bench_id)
    engine = InferenceEngine(model, processor)
    prompt = chat_prompt(processor)

    def timed(image, n: int) -> float:
        start = time.perf_counter()
        completion = engine.submit(Request(prompt, [image], exact(n))).result()
        elapsed = time.perf_counter() - start
        if completion.error is not None:
            raise completion.error
        if completion.completion_tokens != n:
            raise RuntimeError(f"asked for exactly {n} tokens, the engine made {completion.completion_tokens}")
        return elapsed

    try:
        ttft, tps = decode_figures(timed, ctx.new_pictures(8), ctx.shape["new_tokens"])
        return chat_row(ttft, tps, model.language_model, ctx.device, ctx.bandwidth)
    finally:
        engine.close()


def bench_generate(ctx: Context, bench_id: str, quantization: str | None) -> dict:
    """The same requests through transformers' own BLIP-2 `generate` on the same checkpoint."""
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    from vlm.loading import quantization_config

    reset_peak(ctx.device)
    checkpoint = ctx.checkpoint("llama")
    model = Blip2ForConditionalGeneration.from_pretrained(
        checkpoint, dtype=torch.bfloat16, device_map={"": ctx.device},  # straight to the device, as ours loads
        quantization_config=quantization_config(quantization, torch.bfloat16)).eval()
    ctx.watch(model)
    fail_on_purpose(bench_id)
    processor = Blip2Processor.from_pretrained(checkpoint)  # it puts the image's query tokens first
    prompt = processor.tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=False,
                                                     add_generation_prompt=True)

    def timed(image, n: int) -> float:
        start = time.perf_counter()
        inputs = processor(images=[image], text=[prompt], return_tensors="pt").to(ctx.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        sync(ctx.device)
        elapsed = time.perf_counter() - start
        made = out.shape[1] - (inputs["input_ids"].shape[1] if out.shape[1] > n else 0)
        if made != n:
            raise RuntimeError(f"asked for exactly {n} tokens, generate made {made}")
        return elapsed

    ttft, tps = decode_figures(timed, ctx.new_pictures(8), ctx.shape["new_tokens"])
    return chat_row(ttft, tps, model.language_model, ctx.device, ctx.bandwidth)


def bench_streams(ctx: Context, bench_id: str, quantization: str | None) -> dict:
    """16 requests submitted at once (one running batch) against the same 16 one after another."""
    from vlm.engine import InferenceEngine, Request

    reset_peak(ctx.device)
    model, processor = ctx.load("llama", quantization)
    fail_on_purpose(bench_id)
    engine = InferenceEngine(model, processor, max_batch_size=STREAMS)
    prompt = chat_prompt(processor)
    settings = exact(ctx.shape["stream_tokens"])

    def run(pictures: list, together: bool) -> float:
        """Total completion tokens/s of one request per picture."""
        start = time.perf_counter()
        if together:
            completions = [s.result() for s in [engine.submit(Request(prompt, [p], settings)) for p in pictures]]
        else:
            completions = [engine.submit(Request(prompt, [p], settings)).result() for p in pictures]
        elapsed = time.perf_counter() - start
        failed = [c.error for c in completions if c.error is not None]
        if failed:
            raise failed[0]
        return sum(c.completion_tokens for c in completions) / elapsed

    try:
        run(ctx.new_pictures(2), together=True)  # warm-up
        sequential = run(ctx.new_pictures(STREAMS), together=False)
        concurrent = run(ctx.new_pictures(STREAMS), together=True)
        return {"concurrent": concurrent, "sequential": sequential, "ratio": concurrent / sequential,
                "peak_batch": engine.stats["peak_batch"], "peak_gib": peak_gib(ctx.device)}
    finally:
        engine.close()


def bench_adapters(ctx: Context, bench_id: str) -> dict:
    """16 requests split over two LoRA fine-tunes on one base (each row through its own LoRA, `vlm serve
    --adapter`) against the same 16 on the plain base, which costs what a merged model costs."""
    from peft import LoraConfig, get_peft_model

    from vlm.engine import InferenceEngine, Request

    reset_peak(ctx.device)
    model, processor = ctx.load("llama", None)
    fail_on_purpose(bench_id)
    folders = []
    for k in range(2):  # random (not zero) LoRA weights: the rows really run their adapter
        lora = LoraConfig(r=16, lora_alpha=32, init_lora_weights=False,
                          target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)")
        peft_model = get_peft_model(model, lora)
        folders.append(ctx.tmp / f"adapter-{k}")
        peft_model.save_pretrained(folders[-1])
        model = peft_model.unload()
    prompt = chat_prompt(processor)
    settings = exact(ctx.shape["stream_tokens"])

    def rate(engine, models: list) -> float:
        pictures = ctx.new_pictures(STREAMS)
        start = time.perf_counter()
        streams = [engine.submit(Request(prompt, [p], settings, model=models[i % len(models)]))
                   for i, p in enumerate(pictures)]
        completions = [s.result() for s in streams]
        failed = [c.error for c in completions if c.error is not None]
        if failed:
            raise failed[0]
        return sum(c.completion_tokens for c in completions) / (time.perf_counter() - start)

    engine = InferenceEngine(model, processor, max_batch_size=STREAMS)
    try:
        rate(engine, [None])  # warm-up
        plain = rate(engine, [None])
    finally:
        engine.close()
    engine = InferenceEngine(model, processor, max_batch_size=STREAMS)
    try:
        for k, folder in enumerate(folders):
            engine.add_adapter(f"a{k}", str(folder))
        split = rate(engine, ["a0", "a1"])
        return {"split": split, "plain": plain, "ratio": split / plain, "peak_gib": peak_gib(ctx.device)}
    finally:
        engine.close()


# -- training ------------------------------------------------------------------------------------------
def bench_train(ctx: Context, bench_id: str, recipe: str) -> dict:
    """Seconds per optimizer step (after the first), samples and tokens per step, peak GPU memory."""
    from transformers import TrainerCallback

    from vlm.train.config import load_config
    from vlm.train.run import train

    checkpoint = ctx.checkpoint("llama")
    folder = ctx.tmp / f"train-{recipe}"
    pictures = images(folder, 8, (320, 240))
    data = folder / "train.jsonl"
    data.write_text("".join(json.dumps({"image": str(p), "text": f"a photo of shape number {i}"}) + "\n"
                            for i, p in enumerate(pictures)))
    times: list[float] = []
    tokens = [0]  # input tokens (attention mask, image positions included) since the last step
    step_tokens: list[int] = []

    class StepTimes(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            ctx.watch(model)
            fail_on_purpose(bench_id)
            model.register_forward_pre_hook(count_tokens, with_kwargs=True)

        def on_step_end(self, args, state, control, **kwargs):
            sync(ctx.device)
            times.append(time.perf_counter())
            step_tokens.append(tokens[0])
            tokens[0] = 0

    def count_tokens(module, args, kwargs):
        if module.training and kwargs.get("attention_mask") is not None:
            tokens[0] += int(kwargs["attention_mask"].sum())

    precision = "bf16" if ctx.device.startswith("cuda") else "fp32"
    config = load_config(recipe, [f"model={checkpoint}", f"data.train={data}", f"output_dir={folder / 'out'}",
                                  f"max_steps={ctx.shape['train_steps']}", f"batch_size={ctx.shape['train_batch']}",
                                  "resume=none", "report_to=none", f"precision={precision}",
                                  "gradient_checkpointing=true", "save_steps=100000", "data.num_workers=0",
                                  "vision_cache_gb=0", "logging_steps=1"])
    reset_peak(ctx.device)
    train(config, callbacks=[StepTimes()])
    return {"samples": config.batch_size * config.grad_accum, "batch": config.batch_size,
            "grad_accum": config.grad_accum, "tokens": statistics.median(step_tokens),
            "seconds_per_step": (times[-1] - times[0]) / (len(times) - 1), "peak_gib": peak_gib(ctx.device)}


# -- captioning ----------------------------------------------------------------------------------------
def bench_caption(ctx: Context, bench_id: str, batch: int) -> dict:
    """`vlm caption` vs transformers' `generate`: marginal images/s between two input sizes, model
    loading excluded (the run's own timer starts after its load)."""
    checkpoint = ctx.checkpoint("opt")
    small, large = ctx.shape["caption_images"]
    pictures = images(ctx.tmp / "caption-images", large)
    new_tokens = 20
    reference = reference_caption_rate(ctx, bench_id, checkpoint, pictures, batch, new_tokens)
    reset_peak(ctx.device)
    seconds = {n: caption_seconds(ctx, checkpoint, pictures[:n], batch, new_tokens) for n in (small, large)}
    ours = (large - small) / (seconds[large] - seconds[small])
    return {"vlm": ours, "transformers": reference, "ratio": ours / reference, "peak_gib": peak_gib(ctx.device)}


def reference_caption_rate(ctx: Context, bench_id: str, checkpoint: Path, pictures: list[Path], batch: int,
                           new_tokens: int) -> float:
    """transformers' BLIP-2 `generate` in batches of `batch`: images decoded before the timer,
    preprocessing (resize, normalise) inside it."""
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    model = Blip2ForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.bfloat16,
                                                          device_map={"": ctx.device}).eval()
    ctx.watch(model)
    fail_on_purpose(bench_id)
    processor = Blip2Processor.from_pretrained(checkpoint)
    processor.tokenizer.padding_side = "left"  # batched generation needs it
    decoded = opened(pictures)

    def seconds(n: int) -> float:
        start = time.perf_counter()
        for i in range(0, n, batch):
            chunk = decoded[i:i + batch]
            inputs = processor(images=chunk, text=["a photo of"] * len(chunk), return_tensors="pt", padding=True)
            inputs = inputs.to(ctx.device)
            inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
            with torch.inference_mode():
                model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
        sync(ctx.device)
        return time.perf_counter() - start

    small, large = ctx.shape["caption_images"]
    seconds(min(batch, small))  # warm-up
    return (large - small) / (seconds(large) - seconds(small))


def caption_seconds(ctx: Context, checkpoint: Path, pictures: list[Path], batch: int, new_tokens: int) -> float:
    """Seconds `vlm caption` spent captioning `pictures` (its summary's time: after the model load)."""
    from vlm.serve import caption

    listing = ctx.tmp / f"list-{len(pictures)}.txt"
    listing.write_text("".join(f"{p}\n" for p in pictures))
    argv = [str(listing), "--out", str(ctx.tmp / f"captions-{batch}-{len(pictures)}.jsonl"), "--model",
            str(checkpoint), "--batch-size", str(batch), "--max-new-tokens", str(new_tokens), "--dtype", "bfloat16",
            "--quantization", "none",  # as the bf16 reference: the 2.7B LLM would load in 4-bit by default on CUDA
            "--device", ctx.device, "--no-progress", "--overwrite", "--prompt", "a photo of"]
    summary = caption.run(caption.build_parser().parse_args(argv), "jsonl")
    if summary.done != len(pictures) or summary.errors:
        raise RuntimeError(f"vlm caption: {summary.line()}")
    return summary.seconds


# -- the plan ------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Bench:
    id: str
    section: str
    label: str
    run: Callable[[Context], dict]
    four_bit: bool = False


def plan(shape: dict) -> list[Bench]:
    """The benchmarks, most important first (a run out of time loses the last ones)."""
    small_batch, large_batch = shape["caption_batches"]
    return [
        Bench("chat-bf16", "chat", "vlm engine, bf16", lambda c: bench_chat(c, "chat-bf16", None)),
        Bench("chat-4bit", "chat", "vlm engine, 4-bit NF4", lambda c: bench_chat(c, "chat-4bit", "4bit"), True),
        Bench("generate-bf16", "chat", "transformers generate, bf16",
              lambda c: bench_generate(c, "generate-bf16", None)),
        Bench("streams-bf16", "streams", "vlm engine, bf16, 16 streams",
              lambda c: bench_streams(c, "streams-bf16", None)),
        Bench("adapters-bf16", "adapters", "vlm engine, bf16, 2 LoRA fine-tunes",
              lambda c: bench_adapters(c, "adapters-bf16")),
        Bench("generate-4bit", "chat", "transformers generate, 4-bit NF4",
              lambda c: bench_generate(c, "generate-4bit", "4bit"), True),
        Bench("train-qlora", "train", "qlora", lambda c: bench_train(c, "train-qlora", "qlora"), True),
        Bench("train-lora", "train", "lora", lambda c: bench_train(c, "train-lora", "lora")),
        Bench(f"caption-{small_batch}", "caption", f"batch {small_batch}",
              lambda c: bench_caption(c, f"caption-{small_batch}", small_batch)),
        Bench(f"caption-{large_batch}", "caption", f"batch {large_batch}",
              lambda c: bench_caption(c, f"caption-{large_batch}", large_batch)),
    ]


# -- preflight -----------------------------------------------------------------------------------------
def preflight(device: str) -> dict[str, str]:
    """Versions of the packages the run imports (or why one does not import), and whether 4-bit
    quantization works on `device` ("ok" or the reason)."""
    found = {}
    for name in ("torch", "transformers", "peft", "accelerate", "pydantic", "bitsandbytes"):
        try:
            importlib.import_module(name)
            found[name] = importlib.metadata.version(name)
        except Exception as e:  # noqa: BLE001 - a broken install is what this check is for
            found[name] = f"not importable ({type(e).__name__}: {e})"
    try:
        found["4-bit"] = check_four_bit(device)
    except Exception as e:  # noqa: BLE001 - e.g. a wheel whose CUDA library does not load
        found["4-bit"] = f"failed: {type(e).__name__}: {e}"
    return found


def check_four_bit(device: str) -> str:
    """Quantize a small tensor to NF4 and back, and run a 4-bit layer, on `device`."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnb_functional

    x = torch.randn(64, 64, dtype=torch.bfloat16, device=device)
    packed, state = bnb_functional.quantize_4bit(x, quant_type="nf4")
    back = bnb_functional.dequantize_4bit(packed, state).float()
    error = float((back - x.float()).abs().mean() / x.float().abs().mean())
    if not error < 0.2:  # NF4 round trips within ~10%; NaN fails too
        raise RuntimeError(f"NF4 round trip off by {error:.0%}")
    layer = bnb.nn.Linear4bit(64, 64, compute_dtype=torch.bfloat16, quant_type="nf4").to(device)
    out = layer(x)
    sync(device)
    if not torch.isfinite(out).all():
        raise RuntimeError("a 4-bit layer's output is not finite")
    return "ok"


# -- report --------------------------------------------------------------------------------------------
def fmt(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def cell(text: str) -> str:
    """`text` as one markdown table cell: no newline, no unescaped pipe, not too long."""
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= 300 else text[:297] + "..."


def sections(shape: dict) -> dict:
    """Per section: its title, its figures' column names, and a row's figures as cells."""
    n = shape["new_tokens"]
    return {
        "chat": ("chat, 7B shape (32k vocabulary), one request at a time",
                 ["TTFT ms (1-token request, new image)", f"decode tokens/s ({n - 1} / (T({n} tokens) - T(1 token)))",
                  "peak GiB", "LLM weights GiB", "fraction of bandwidth limit"],
                 lambda r: [fmt(r["ttft_ms"], 0), fmt(r["tokens_per_s"], 1), fmt(r["peak_gib"]), fmt(r["llm_gib"]),
                            fmt(r["bandwidth_fraction"])]),
        "streams": (f"{STREAMS} requests of {shape['stream_tokens']} tokens, 7B shape, new image each",
                    [f"{STREAMS} concurrent: tokens/s in all", f"{STREAMS} one after another: tokens/s in all",
                     "ratio", "peak batch", "peak GiB"],
                    lambda r: [fmt(r["concurrent"], 1), fmt(r["sequential"], 1), fmt(r["ratio"]),
                               str(r["peak_batch"]), fmt(r["peak_gib"])]),
        "adapters": (f"{STREAMS} requests of {shape['stream_tokens']} tokens, 7B shape: split over two LoRA "
                     "fine-tunes on one base vs all on the plain base (what a merged model costs)",
                     [f"{STREAMS} split over 2 fine-tunes: tokens/s", f"{STREAMS} on the plain base: tokens/s",
                      "ratio", "peak GiB"],
                     lambda r: [fmt(r["split"], 1), fmt(r["plain"], 1), fmt(r["ratio"]), fmt(r["peak_gib"])]),
        "train": ("training, 7B shape (`vlm train` preset)",
                  ["samples/step (batch x grad_accum)", "input tokens/step", "s/step", "peak GiB"],
                  lambda r: [f"{r['samples']} ({r['batch']} x {r['grad_accum']})", fmt(r["tokens"], 0),
                             fmt(r["seconds_per_step"]), fmt(r["peak_gib"])]),
        "caption": ("caption, OPT-2.7B shape, bf16: images/s between runs of {} and {} images".format(
                        *shape["caption_images"]),
                    ["vlm caption images/s (decoding in its workers, load excluded)",
                     "transformers generate images/s (images decoded before its timer)", "ratio", "peak GiB (vlm)"],
                    lambda r: [fmt(r["vlm"], 1), fmt(r["transformers"], 1), fmt(r["ratio"]), fmt(r["peak_gib"])]),
    }


def report(results: dict, benches: list[Bench], info: dict) -> str:
    """The whole markdown report: a heading, then one table per section with a row for every
    benchmark (its figures, or its error, or why it was skipped, or that it has not run yet)."""
    checks = info["preflight"]
    lines = [f"### {info['mode']} run, {info['date']}, {info['device_name']}", "",
             f"`{info['command']}` · " + ", ".join(f"{k} {v}" for k, v in checks.items() if k != "4-bit")
             + f" · 4-bit on {info['device']}: {checks['4-bit']} · copy bandwidth {info['bandwidth'] / 1e9:.0f} GB/s"
             + f" · budget {info['budget_s']:.0f} s", ""]
    for section, (title, columns, values) in sections(info["shape"]).items():
        header = [title, *columns, "model freed at del", "status"]
        lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        for bench in (b for b in benches if b.section == section):
            r = results.get(bench.id, {"status": "not run yet"})
            figures = values(r) if r["status"] == "ok" else ["-"] * len(columns)
            row = [bench.label, *figures, r.get("freed", "-"), r["status"]]
            lines.append("| " + " | ".join(cell(c) for c in row) + " |")
        lines.append("")
    if "seconds" in info:
        lines.append(f"({info['seconds']:.0f} s in all)")
    return "\n".join(lines) + "\n"


def write(path: Path | None, text: str) -> None:
    """Replace `path` in one step: a reader (or a run killed now) never sees half a table."""
    if path is None:
        return
    part = path.with_name(path.name + ".part")
    part.write_text(text)
    os.replace(part, path)


# -- running -------------------------------------------------------------------------------------------
def run_one(bench: Bench, ctx: Context) -> dict:
    """Run `bench`, catching its failure; then check that the models it loaded died with it."""
    ctx.watched.clear()
    start = time.perf_counter()
    try:
        result = {**bench.run(ctx), "status": "ok"}
    except Exception as e:  # noqa: BLE001 - one benchmark's failure must not cost the others
        traceback.print_exc()
        result = {"status": f"error: {type(e).__name__}: {e}"}
    result["seconds"] = time.perf_counter() - start
    loaded, alive = len(ctx.watched), ctx.alive()
    gc.collect()
    leaked = ctx.alive()
    if not loaded:
        result["freed"] = "-"
    elif leaked:
        result["freed"] = f"LEAKED: {leaked} of {loaded} alive after gc.collect()"
    else:
        result["freed"] = "yes" if not alive else f"no: {alive} of {loaded} waited for gc.collect()"
    ctx.watched.clear()
    return result


def skip_reason(bench: Bench, elapsed: float, budget: float, four_bit: str, skip: list[str]) -> str | None:
    if any(bench.id == s or bench.id.startswith(s + "-") for s in skip):
        return "skipped: --skip"
    if bench.four_bit and four_bit != "ok":
        return f"skipped: 4-bit does not work here ({four_bit})"
    if elapsed > budget:
        return f"skipped: the {budget:.0f} s budget was spent ({elapsed:.0f} s)"
    return None


def run_all(benches: list[Bench], ctx: Context, info: dict, args: argparse.Namespace, started: float) -> dict:
    """Every benchmark in order, `--out` rewritten after each."""
    results: dict = {}
    write(args.out, report(results, benches, info))
    with watching_loads(ctx):
        for bench in benches:
            elapsed = time.perf_counter() - started
            reason = skip_reason(bench, elapsed, args.budget_s, info["preflight"]["4-bit"], args.skip)
            if reason is not None:
                results[bench.id] = {"status": reason}
            else:
                gc.collect()
                print(f"== {bench.id} at {elapsed:.0f} s: {allocated(ctx.device)} (after gc.collect())", flush=True)
                results[bench.id] = run_one(bench, ctx)
                print(f"{bench.id}: {results[bench.id]}", flush=True)
            write(args.out, report(results, benches, info))
    return results


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU: checks the code, measures nothing useful")
    p.add_argument("--out", type=Path, help="also write the markdown report here (rewritten after each benchmark)")
    p.add_argument("--device", default=None, help="default: cuda (cpu with --smoke)")
    p.add_argument("--budget-s", type=float, default=500.0,
                   help="benchmarks that would start later than this many seconds into the run are skipped (500)")
    p.add_argument("--skip", nargs="*", default=[], metavar="ID",
                   help="benchmark ids or prefixes to leave out: chat, generate, streams, train, caption, chat-4bit...")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks; 0 when every one that ran succeeded, 1 otherwise (the report is written either way)."""
    args = parse_args(argv)
    started = time.perf_counter()
    device = args.device or ("cpu" if args.smoke else "cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("error: no CUDA device (run with --smoke to check the script on CPU)", file=sys.stderr)
        return 1
    shape = SHAPES["smoke" if args.smoke else "full"]
    checks = preflight(device)  # first: imports leave cyclic garbage that would hold a benchmark's frames
    print(f"preflight: {checks}", flush=True)
    info = {"mode": "smoke (tiny shapes)" if args.smoke else "full (real shapes)", "preflight": checks, "shape": shape,
            "date": datetime.date.today().isoformat(), "device": device, "budget_s": args.budget_s,
            "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "CPU",
            "command": "python bench/gpu.py" + (" --smoke" if args.smoke else ""), "bandwidth": copy_bandwidth(device)}
    benches = plan(shape)
    tmp = Path(tempfile.mkdtemp(prefix="vlm-gpu-bench-"))
    try:
        ctx = Context(device, shape, tmp, info["bandwidth"])
        results = run_all(benches, ctx, info, args, started)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    info["seconds"] = time.perf_counter() - started
    table = report(results, benches, info)
    print(table)
    write(args.out, table)
    return 1 if any(r["status"].startswith("error") for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
