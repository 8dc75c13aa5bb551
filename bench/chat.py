"""Chat latency: `vlm chat`'s streaming path against transformers' own BLIP-2 generate.

Both sides load the SAME official-format `Blip2ForConditionalGeneration` checkpoint (random
weights, built here offline), answer the same image + question greedily with exactly
`--new-tokens` tokens (min = max, so EOS cannot shorten one side); transformers streams through
`TextIteratorStreamer`, vlm through its inference engine's stream (the path `vlm chat` and the API
take). Measured from the request (raw image + text) to:

- TTFT: the first streamed token (transformers) / text piece (vlm's engine stream);
- decode tokens/s: (tokens - 1) / (last - first).

Printed as ratios (>= 1.0 means `vlm` is at least as fast). The vlm side is measured on the
second turn of a conversation too, where the image is already encoded (the chat's cache).

    python bench/chat.py                  # CPU, a random LLM 1024 wide x 8 layers
    python bench/chat.py --device cuda --llm-width 4096 --llm-layers 32 --quantization 4bit
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def build_checkpoint(folder: Path, args) -> Path:
    """An official BLIP-2 checkpoint with a Llama LLM of the requested shape."""
    from tiny import image_processor, make_tokenizer
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, LlamaConfig

    tokenizer = make_tokenizer("llama", chat=True)
    processor = Blip2Processor(image_processor(), tokenizer, num_query_tokens=args.queries)
    w = args.llm_width
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=w,
        intermediate_size=int(w * 2.6875) // 64 * 64,
        num_hidden_layers=args.llm_layers,
        num_attention_heads=max(1, w // 64),
        num_key_value_heads=max(1, w // 64),
        max_position_embeddings=2048,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    config = Blip2Config(
        vision_config={
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 30,
            "patch_size": 10,
        },
        qformer_config={
            "hidden_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 256,
            "cross_attention_frequency": 1,
            "vocab_size": 200,
            "max_position_embeddings": 64,
        },
        text_config=text.to_dict(),
        num_query_tokens=args.queries,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(0)
    Blip2ForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def timed_streamer(tokenizer):
    """A `TextIteratorStreamer` that also notes when each generated token arrives.

    Text alone is a poor clock: the streamer holds text back until a word ends, and random
    weights often emit tokens that decode to nothing, so we time the tokens themselves.
    """
    from transformers import TextIteratorStreamer

    class Timed(TextIteratorStreamer):
        def __init__(self):
            super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
            self.token_times: list[float] = []

        def put(self, value):
            if not self.next_tokens_are_prompt:
                self.token_times.extend([time.perf_counter()] * value.reshape(-1).shape[0])
            super().put(value)

    return Timed()


def timed_stream(start_generation, tokenizer) -> tuple[float, float, int]:
    """Run a streamed generation; returns (ttft_s, decode_tokens_per_s, tokens)."""
    streamer = timed_streamer(tokenizer)
    t0 = time.perf_counter()
    result = {}
    thread = threading.Thread(target=lambda: result.update(out=start_generation(streamer)))
    thread.start()
    for _ in streamer:  # consume the text as a chat would
        pass
    thread.join()
    times = streamer.token_times
    tokens = int(result["out"])
    return times[0] - t0, (tokens - 1) / max(times[-1] - times[0], 1e-9), tokens


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="default: fp32 on CPU, bf16 on CUDA")
    p.add_argument("--quantization", default=None, choices=["4bit", "8bit"])
    p.add_argument("--llm-width", type=int, default=1024)  # smaller LLMs make ms-level TTFT ratios noise
    p.add_argument("--llm-layers", type=int, default=8)
    p.add_argument("--queries", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from tiny import random_image
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    from vlm import load_pretrained
    from vlm.engine import GenerationSettings, InferenceEngine
    from vlm.loading import default_dtype, quantization_config
    from vlm.serve.conversation import new_turn
    from vlm.serve.frontend import ChatFrontend

    dtype = getattr(torch, args.dtype) if args.dtype else default_dtype(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_checkpoint(Path(tmp) / "blip2", args)
        image_path = Path(tmp) / "image.png"
        random_image(0, (320, 240)).save(image_path)
        question = "what shape is in the picture?"

        model, processor = load_pretrained(str(folder), quantization=args.quantization, device=args.device, dtype=dtype)
        engine = InferenceEngine(model, processor)
        frontend = ChatFrontend(engine, upload_dirs=[tmp])  # the image lives here, not in an upload
        hf_kwargs = {"dtype": dtype}
        if args.quantization:
            hf_kwargs.update(
                quantization_config=quantization_config(args.quantization, dtype), device_map={"": args.device}
            )
        hf_model = Blip2ForConditionalGeneration.from_pretrained(folder, **hf_kwargs).eval()
        if not args.quantization:
            hf_model.to(args.device)
        hf_processor = Blip2Processor.from_pretrained(folder)
        prompt = processor.format_chat([{"role": "user", "content": question}])
        n = args.new_tokens
        gen = {"max_new_tokens": n, "min_new_tokens": n, "do_sample": False}

        def hf_run(streamer):
            from PIL import Image

            inputs = hf_processor(images=Image.open(image_path).convert("RGB"), text=prompt, return_tensors="pt")
            inputs = inputs.to(args.device)
            inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
            with torch.no_grad():
                out = hf_model.generate(**inputs, streamer=streamer, **gen)
            return out.shape[1] - inputs["input_ids"].shape[1] if out.shape[1] > n else out.shape[1]

        def vlm_run(fresh: bool):
            """The chat's path: turns -> request -> the engine's running batch (exactly n tokens)."""
            def run(timed):
                if fresh:
                    engine.feature_cache.clear()  # a new image: the vision tower runs
                turn = new_turn(question, [str(image_path)])
                settings = GenerationSettings(max_new_tokens=n, min_new_tokens=n)
                stream = frontend.submit(frontend.prepare([turn], settings=settings))
                for _ in stream:
                    timed.token_times.append(time.perf_counter())
                timed.end()
                return stream.completion.completion_tokens

            return run

        rows = {"transformers": [], "vlm (new image)": [], "vlm (cached image)": []}
        for i in range(args.repeats + 1):  # the first round warms up
            r = {
                "transformers": timed_stream(hf_run, hf_processor.tokenizer),
                "vlm (new image)": timed_stream(vlm_run(fresh=True), processor.tokenizer),
                "vlm (cached image)": timed_stream(vlm_run(fresh=False), processor.tokenizer),
            }
            if i:
                for k, v in r.items():
                    rows[k].append(v)

    llm_params = sum(p.numel() for p in model.language_model.parameters()) / 1e6
    print(
        f"device {args.device}, dtype {str(dtype).replace('torch.', '')}, quantization {args.quantization}, "
        f"LLM {llm_params:.0f}M params ({args.llm_width} wide x {args.llm_layers}), {args.queries} queries, "
        f"{n} new tokens, median of {args.repeats}, torch threads {torch.get_num_threads()}"
    )
    med = {k: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v)) for k, v in rows.items()}
    for k, (ttft, tps) in med.items():
        print(f"  {k:<20} TTFT {ttft * 1000:8.1f} ms   decode {tps:8.1f} tokens/s   (tokens {rows[k][0][2]})")
    hf_ttft, hf_tps = med["transformers"]
    for k in ("vlm (new image)", "vlm (cached image)"):
        ttft, tps = med[k]
        print(
            f"  ratio {k:<20} TTFT x{hf_ttft / ttft:.2f} (transformers/vlm)   "
            f"decode x{tps / hf_tps:.2f} (vlm/transformers)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
