"""`vlm chat`: a Gradio web chat about images, with a `/chat` API endpoint.

Binds to 127.0.0.1 unless told otherwise. Loads the model once; 4-bit NF4 on CUDA by default
(vision tower and Q-Former stay full precision), no quantization on CPU unless asked.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import sys

from vlm.errors import VLMError

LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}

EPILOG = """examples:
  vlm chat                                  # demo model, http://127.0.0.1:7860
  vlm chat --model ./my-finetune --port 8080
  vlm chat --model Salesforce/blip2-opt-2.7b --quantization 4bit
  vlm chat --host 0.0.0.0 --auth alice:s3cret   # reachable from the network: set --auth

API (gradio_client):
  from gradio_client import Client, handle_file
  c = Client("http://127.0.0.1:7860/")
  c.predict(message={"text": "What is this?", "files": [handle_file("cat.jpg")]}, api_name="/chat")
  c.predict(message={"text": "And its colour?", "files": []}, api_name="/chat")  # same conversation
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vlm chat",
        description="Web chat about images (Gradio): multi-turn, several images per conversation, streaming.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model",
        default=None,
        help="checkpoint folder or hub id (vlm, BLIP-2, InstructBLIP or a "
        "LoRA adapter folder); default: the offline demo model",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument(
        "--quantization",
        choices=["4bit", "8bit", "none"],
        default=None,
        help="quantize the LLM with bitsandbytes (default: 4bit NF4 on CUDA, none on CPU)",
    )
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu... (default: CUDA when available)")
    p.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="weights dtype (default: bf16 on GPUs that support it, fp32 on CPU)",
    )
    p.add_argument("--share", action="store_true", help="also publish a public *.gradio.live link (opt-in)")
    p.add_argument("--auth", default=None, metavar="USER:PASS", help="require this login on the page and API")
    p.add_argument("--concurrency", type=int, default=2, help="replies generated at the same time (default 2)")
    p.add_argument(
        "--max-queue",
        type=int,
        default=32,
        help="requests allowed to wait; beyond that users are told the server is busy (default 32)",
    )
    p.add_argument("--max-file-size", type=int, default=20, metavar="MB", help="upload size limit (default 20)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="default answer length limit (default 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="default temperature; 0 is greedy (default 0)")
    p.add_argument("--top-p", type=float, default=0.9, help="default nucleus sampling top-p (default 0.9)")
    p.add_argument("--system-prompt", default="", help="default system prompt")
    p.add_argument("--no-examples", action="store_true", help="hide the example images and prompts")
    return p


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def parse_auth(value: str | None) -> tuple[str, str] | None:
    if value is None:
        return None
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise VLMError(f"--auth must be USER:PASS with both parts non-empty; got {value!r}")
    return user, password


def check_args(args: argparse.Namespace) -> None:
    """Reject impossible values with one line naming the flag."""
    if not 0 < args.port < 65536:
        raise VLMError(f"--port must be 1..65535; got {args.port}")
    for flag in ("concurrency", "max_queue", "max_file_size", "max_new_tokens"):
        if getattr(args, flag) < 1:
            raise VLMError(f"--{flag.replace('_', '-')} must be at least 1; got {getattr(args, flag)}")
    if args.temperature < 0:
        raise VLMError(f"--temperature must be >= 0; got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise VLMError(f"--top-p must be in (0, 1]; got {args.top_p}")


def exposure_warnings(host: str, share: bool, auth) -> list[str]:
    """Warnings to print before serving beyond this machine without a login."""
    out = []
    if not is_loopback(host) and auth is None:
        out.append(f"warning: serving on {host} without --auth: anyone who can reach this port can use the model")
    if share and auth is None:
        out.append("warning: --share publishes a public link; set --auth USER:PASS to restrict it")
    return out


def load(args: argparse.Namespace):
    """Load the model; returns `(model, processor, settings)`."""
    import torch

    from vlm.loading import default_device, default_dtype, load_pretrained

    from .app import ChatSettings

    device = args.device or default_device()
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise VLMError(f"--device {device}: CUDA is not available on this machine")
    quantization = args.quantization or ("4bit" if device.startswith("cuda") else "none")
    dtype = getattr(torch, args.dtype) if args.dtype else default_dtype(device)
    model, processor = load_pretrained(args.model, quantization=quantization, device=device, dtype=dtype)
    settings = ChatSettings(
        model_name=args.model or "demo (offline default)",
        device=device,
        dtype=str(dtype).replace("torch.", ""),
        quantization="NF4 4-bit (LLM only)" if quantization == "4bit" else quantization,
        system_prompt=args.system_prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        concurrency=args.concurrency,
        examples=not args.no_examples,
    )
    return model, processor, settings


def make_engine(model, processor, args: argparse.Namespace):
    """The `ChatEngine` for `args`: `--max-file-size` is its upload limit (the page's and the engine's)."""
    from .engine import ChatEngine

    return ChatEngine(model, processor, max_upload_bytes=args.max_file_size * 1024 * 1024)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `vlm chat`."""
    args = build_parser().parse_args(argv)
    check_args(args)
    auth = parse_auth(args.auth)
    for line in exposure_warnings(args.host, args.share, auth):
        print(line, file=sys.stderr)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    model, processor, settings = load(args)
    from .app import build_app, offline_theme

    engine = make_engine(model, processor, args)
    demo = build_app(engine, settings)
    demo.queue(default_concurrency_limit=args.concurrency, max_size=args.max_queue)
    print(
        f"vlm chat: {settings.model_name} on {settings.device} ({settings.dtype}, {settings.quantization}); "
        f"open http://{args.host}:{args.port}/",
        flush=True,
    )
    try:
        demo.launch(
            server_name=args.host,
            server_port=args.port,
            share=args.share,
            auth=auth,
            max_file_size=f"{args.max_file_size}mb",
            allowed_paths=[],  # serve uploads and Gradio's own cache only
            show_error=True,
            ssr_mode=False,
            theme=offline_theme(),
            quiet=True,
        )
    except OSError as e:
        raise VLMError(f"--port {args.port}: cannot listen on {args.host}:{args.port} ({e})") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
