"""`vlm chat`: a Gradio web chat about images at `/`, and the OpenAI-compatible API at `/v1`.

One process, one inference engine: the page's users and the API's clients are decoded together.
Binds to 127.0.0.1 unless told otherwise. On CUDA, LLMs of 1B+ parameters load in 4-bit NF4 by
default (vision tower and Q-Former stay full precision); smaller ones and CPU runs keep full
precision unless asked.
"""

from __future__ import annotations

import argparse
import logging
import sys

from vlm.errors import VLMError

from .server import (
    add_model_arguments,
    api_settings,
    bind,
    check_limits,
    image_limits,
    is_loopback,
    model_name,
    run_server,
    start_engine,
)

EPILOG = """examples:
  vlm chat                                  # demo model, http://127.0.0.1:7860 (API at /v1)
  vlm chat --model ./my-finetune --port 8080
  vlm chat --model Salesforce/blip2-opt-2.7b --quantization 4bit
  vlm chat --host 0.0.0.0 --auth alice:s3cret --api-key KEY   # reachable from the network

API (gradio_client):
  from gradio_client import Client, handle_file
  c = Client("http://127.0.0.1:7860/")
  c.predict(message={"text": "What is this?", "files": [handle_file("cat.jpg")]}, api_name="/chat")
  c.predict(message={"text": "And its colour?", "files": []}, api_name="/chat")  # same conversation

OpenAI-compatible API on the same port: http://127.0.0.1:7860/v1 (see `vlm serve --help`). Off a
loopback address it is served only with --api-key.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vlm chat",
        description="Web chat about images (Gradio): multi-turn, several images per conversation, streaming; "
                    "plus the OpenAI-compatible API under /v1.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    add_model_arguments(p, default_port=7860)
    p.add_argument("--share", action="store_true",
                   help="also publish a public *.gradio.live link (opt-in; the /v1 API is not served then)")
    p.add_argument("--auth", default=None, metavar="USER:PASS", help="require this login on the page")
    p.add_argument("--concurrency", type=int, default=16,
                   help="replies generated at the same time, decoded together in one batch (default 16)")
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


def parse_auth(value: str | None) -> tuple[str, str] | None:
    if value is None:
        return None
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise VLMError(f"--auth must be USER:PASS with both parts non-empty; got {value!r}")
    return user, password


def check_args(args: argparse.Namespace) -> None:
    """Reject impossible values with one line naming the flag."""
    check_limits(args)
    for flag in ("concurrency", "max_queue", "max_file_size", "max_new_tokens"):
        if getattr(args, flag) < 1:
            raise VLMError(f"--{flag.replace('_', '-')} must be at least 1; got {getattr(args, flag)}")
    if args.temperature < 0:
        raise VLMError(f"--temperature must be >= 0; got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise VLMError(f"--top-p must be in (0, 1]; got {args.top_p}")


def exposure_warnings(host: str, share: bool, auth, api_key: str | None = None) -> list[str]:
    """Warnings to print before serving beyond this machine without a login."""
    out = []
    if not is_loopback(host) and auth is None:
        out.append(f"warning: serving on {host} without --auth: anyone who can reach this port can use the model")
    if not is_loopback(host) and api_key is None:
        out.append(f"note: the /v1 API is off on {host} without --api-key")
    if share and auth is None:
        out.append("warning: --share publishes a public link; set --auth USER:PASS to restrict it")
    return out


def settings_for(args: argparse.Namespace, loaded):
    """What the page shows and the defaults of its controls."""
    from vlm.registry import DEFAULT_MODEL

    from .app import ChatSettings

    quantization = {"4bit": "NF4 4-bit (LLM only)", "8bit": "8-bit (LLM only)"}.get(loaded.quantization, "none")
    return ChatSettings(
        model_name=args.model or "demo (offline default)",
        device=loaded.device,
        dtype=loaded.dtype,
        quantization=f"{quantization} ({loaded.llm_parameters / 1e9:.2f}B-parameter LLM)",
        system_prompt=args.system_prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        concurrency=args.concurrency,
        examples=not args.no_examples,
        source=args.model or DEFAULT_MODEL,
        models=(model_name(args), *(name for name, _ in args.adapter)),
    )


def make_frontend(engine, args: argparse.Namespace, images=None):
    """The `ChatFrontend` for `args`: `--max-file-size` is its upload limit (the page's and the frontend's);
    `images`: the `ImageLimits` it shares with the API (one decode budget per process)."""
    from .frontend import ChatFrontend

    max_bytes = args.max_file_size * 1024 * 1024
    return ChatFrontend(engine, max_upload_bytes=max_bytes, limits=images or image_limits(args, max_bytes))


def main(argv: list[str] | None = None) -> int:
    """Entry point of `vlm chat`."""
    args = build_parser().parse_args(argv)
    check_args(args)
    auth = parse_auth(args.auth)
    for line in exposure_warnings(args.host, args.share, auth, args.api_key):
        print(line, file=sys.stderr)
    sock = None if args.share else bind(args.host, args.port)  # a taken port fails before the model loads
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


    from .api import make_app
    from .app import build_app, offline_theme

    loaded, engine = start_engine(args, args.concurrency, args.max_queue)
    settings = settings_for(args, loaded)
    images = image_limits(args, args.max_file_size * 1024 * 1024)
    frontend = make_frontend(engine, args, images)
    demo = build_app(frontend, settings)
    demo.queue(default_concurrency_limit=args.concurrency, max_size=args.max_queue)
    page = dict(auth=auth, max_file_size=f"{args.max_file_size}mb", allowed_paths=[], show_error=True,
                ssr_mode=False, theme=offline_theme())
    print(f"vlm chat: {settings.model_name} on {loaded.description}; open http://{args.host}:{args.port}/",
          flush=True)
    if args.share:  # Gradio's own server makes the share tunnel; the API needs ours
        demo.launch(server_name=args.host, server_port=args.port, share=True, quiet=True, **page)
        return 0
    import gradio as gr

    with_api = is_loopback(args.host) or args.api_key is not None
    from .file_guard import FileRefGuard

    api = api_settings(args, images)
    app = gr.mount_gradio_app(make_app(engine, api, with_api=with_api), demo, path="/", **page)
    # Gradio checks client-sent file paths only once `launch()` has run, which a mounted page never
    # does: switch its check on as `launch()` would, and check every file reference ourselves first.
    demo.has_launched = True
    return run_server(FileRefGuard(app, frontend.upload_dirs), sock, engine)


if __name__ == "__main__":
    sys.exit(main())
