"""`vlm serve`: the OpenAI-compatible API alone; and the HTTP plumbing `vlm chat` shares with it."""

from __future__ import annotations

import argparse
import gc
import ipaddress
import logging
import signal
import socket
import sys
from pathlib import Path

from vlm.errors import VLMError
from vlm.load_policy import add_load_arguments, load_from_args

from .body import BODY_TIMEOUT_S
from .uploads import MAX_DECODING_PIXELS, MAX_REQUEST_PIXELS, REMOTE_TIMEOUT_S

LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}

EPILOG = """examples:
  vlm serve                                            # the demo model, http://127.0.0.1:8000/v1
  vlm serve --model Salesforce/blip2-opt-2.7b --quantization 4bit
  vlm serve --host 0.0.0.0 --api-key "$(openssl rand -hex 16)"   # beyond this machine: a key is required

from Python (pip install openai):
  from openai import OpenAI
  client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused-on-loopback")
  image = "data:image/png;base64," + base64.b64encode(open("cat.png", "rb").read()).decode()
  client.chat.completions.create(model=client.models.list().data[0].id, temperature=0, messages=[
      {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                   {"type": "text", "text": "What is in this picture?"}]}])

Requests from many clients are decoded together (continuous batching); each image is encoded
once (follow-ups that resend it cost no vision pass). Monitoring: GET /metrics (Prometheus), GET /health
(alive) and GET /ready (503 while the queue is full or the engine has stopped; no key needed).
"""


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def add_model_arguments(p: argparse.ArgumentParser, default_port: int) -> None:
    """Flags `vlm serve` and `vlm chat` share: the model (`add_load_arguments`), the address, the limits."""
    add_load_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=default_port, help=f"port (default {default_port})")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help="require `Authorization: Bearer KEY` on /v1 (required when --host is not loopback)")
    p.add_argument("--allow-remote-images", action="store_true",
                   help="let API requests name http(s) image URLs, fetched by the server (off: data: URLs only); "
                        "only public addresses are fetched, checked after DNS and after each redirect")
    p.add_argument("--allow-private-image-hosts", action="store_true",
                   help="with --allow-remote-images: also fetch from loopback, private, link-local and other "
                        "non-public addresses (the server's own network: allow only for clients you trust)")
    p.add_argument("--remote-image-timeout", type=float, default=REMOTE_TIMEOUT_S, metavar="SECONDS",
                   help=f"total time a remote image may take to arrive (default {REMOTE_TIMEOUT_S:g})")
    p.add_argument("--served-model-name", default=None,
                   help="the model id the API lists and expects (default: the --model name, or vlm-demo)")
    p.add_argument("--max-request-mb", type=int, default=64, help="largest API request body (default 64)")
    p.add_argument("--body-timeout", type=float, default=BODY_TIMEOUT_S, metavar="SECONDS",
                   help=f"time an API request body may take to arrive (default {BODY_TIMEOUT_S:g})")
    p.add_argument("--max-request-pixels", type=int, default=MAX_REQUEST_PIXELS, metavar="N",
                   help=f"decoded pixels of all images in one request or chat message (default {MAX_REQUEST_PIXELS:,}; "
                        "over it: HTTP 413 / a notice in the chat)")
    p.add_argument("--max-decoding-pixels", type=int, default=MAX_DECODING_PIXELS, metavar="N",
                   help=f"pixels decoded at once over the whole server, which bounds its image memory (default "
                        f"{MAX_DECODING_PIXELS:,}, ~{MAX_DECODING_PIXELS * 3 // 2**20} MB of RGB); more wait")
    p.add_argument("--adapter", action="append", type=adapter_flag, default=[], metavar="NAME=PATH",
                   help="also serve the LoRA output of `vlm train` at PATH as model NAME, on the same base (one copy "
                        "of it in memory); repeatable. Requests choose by their `model` field")
    p.add_argument("--adapter-for-text", action="store_true",
                   help="with a LoRA adapter folder as --model: run conversations without images through the "
                        "adapter too (default: they get the base LLM's answers, so text chat stays as it was)")


def check_limits(args: argparse.Namespace) -> None:
    """One line naming the flag for a limit that cannot work."""
    for flag in ("max_request_mb", "max_request_pixels", "max_decoding_pixels"):
        if getattr(args, flag) < 1:
            raise VLMError(f"--{flag.replace('_', '-')} must be at least 1; got {getattr(args, flag)}")
    for flag in ("remote_image_timeout", "body_timeout"):
        if getattr(args, flag) <= 0:
            raise VLMError(f"--{flag.replace('_', '-')} must be above 0 seconds, got {getattr(args, flag):g}")
    if args.allow_private_image_hosts and not args.allow_remote_images:
        raise VLMError("--allow-private-image-hosts needs --allow-remote-images")


def image_limits(args: argparse.Namespace, max_bytes: int | None = None):
    """The `ImageLimits` (with the server's one decode budget) from the shared flags."""
    from .uploads import ImageLimits, PixelBudget

    limits = ImageLimits(max_request_pixels=args.max_request_pixels, budget=PixelBudget(args.max_decoding_pixels))
    if max_bytes is not None:
        limits.max_bytes = max_bytes
    return limits


def adapter_flag(text: str) -> tuple[str, str]:
    """`--adapter NAME=PATH` as (NAME, PATH)."""
    name, sep, path = text.partition("=")
    if not sep or not name.strip() or not path.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name.strip(), path.strip()


def start_engine(args: argparse.Namespace, max_batch_size: int, max_waiting: int):
    """Load the model and start its inference engine, with every `--adapter` fine-tune added;
    returns (the loaded model, the engine).

    Both happen in a thread that then ends. On CPU each thread that runs parallel torch work
    keeps an OpenMP thread team; while another team lives beside the engine thread's, libgomp
    stops the engine's workers from spinning between operations (more threads than cores), so
    every small operation pays a wake-up: with two LoRA fine-tunes that slowed decoding by a
    third (bench/serve.py --adapters 2). A team goes with its thread."""
    from concurrent.futures import ThreadPoolExecutor

    def load():
        loaded = load_from_args(args)
        return loaded, _engine(args, loaded, max_batch_size, max_waiting)

    with ThreadPoolExecutor(1, thread_name_prefix="vlm-load") as pool:
        return pool.submit(load).result()


def _engine(args: argparse.Namespace, loaded, max_batch_size: int, max_waiting: int):
    from vlm.engine import InferenceEngine

    engine = InferenceEngine(loaded.model, loaded.processor, max_batch_size=max_batch_size, max_waiting=max_waiting,
                             adapter_for_text=args.adapter_for_text)
    served = {model_name(args)}
    for name, path in args.adapter:
        if name in served:
            raise VLMError(f"--adapter {name}={path}: the name {name!r} is served already")
        engine.add_adapter(name, path)
        served.add(name)
    return engine


def api_settings(args: argparse.Namespace, images=None):
    """The API's `ApiSettings` from the shared flags; `images`: the `ImageLimits` to share (the chat's)."""
    from .api import ApiSettings

    check_limits(args)
    return ApiSettings(model_name(args), api_key=args.api_key, allow_remote_images=args.allow_remote_images,
                       allow_private_image_hosts=args.allow_private_image_hosts,
                       remote_timeout_s=args.remote_image_timeout, max_body_bytes=args.max_request_mb * 2**20,
                       body_timeout_s=args.body_timeout, images=images or image_limits(args))


def model_name(args: argparse.Namespace) -> str:
    if args.served_model_name:
        return args.served_model_name
    return Path(args.model.rstrip("/")).name if args.model and Path(args.model).exists() else (args.model or "vlm-demo")


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, or a one-line VLMError naming the flag (port taken, bad address)."""
    if not 0 < port < 65536:
        raise VLMError(f"--port must be 1..65535; got {port}")
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(info[0], socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(info[4])
    except OSError as e:
        raise VLMError(f"--port {port}: cannot listen on {host}:{port} ({e})") from None
    return sock


def run_server(app, sock: socket.socket, engine) -> int:
    """Serve `app` (ASGI) on `sock` until interrupted, or until `engine` stops after a device fault;
    returns the exit status: 0, or 1 after a fault, so a supervisor restarts the server."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))

    def stop() -> None:  # in the engine's thread; uvicorn polls the flag
        server.should_exit = True

    engine.on_failure = stop
    # uvicorn stops gracefully on SIGTERM, then raises the signal again for the handler it found:
    # with the default one the process died there (status -15) without closing the engine. A
    # supervisor's stop is a clean exit: this handler asks for a stop, and the engine closes below.
    previous = signal.signal(signal.SIGTERM, lambda *_: stop())
    try:
        server.run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
    engine.close()
    # The process exits next: frozen objects skip the interpreter's last full collection over every
    # torch and transformers object, which took most of a stopped server's exit time.
    gc.freeze()
    if engine.failure is not None:
        print(f"error: the inference engine stopped ({engine.failure}); exiting so that a supervisor can restart "
              "the server", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vlm serve",
        description="Serve the OpenAI-compatible API (POST /v1/chat/completions with image_url parts, "
                    "GET /v1/models) for one model.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    add_model_arguments(p, default_port=8000)
    p.add_argument("--max-batch-size", type=int, default=16, help="replies decoded together (default 16)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests allowed to wait; beyond that the API answers 503 (default 64)")
    return p


def check_exposure(args: argparse.Namespace) -> None:
    if not is_loopback(args.host) and not args.api_key:
        raise VLMError(f"--host {args.host} makes the API reachable from other machines: set --api-key KEY")


def main(argv: list[str] | None = None) -> int:
    """Entry point of `vlm serve`."""
    args = build_parser().parse_args(argv)  # first: --help and flag errors need no torch
    from .api import make_app

    check_exposure(args)
    check_limits(args)
    for flag in ("max_batch_size", "max_queue"):
        if getattr(args, flag) < 1:
            raise VLMError(f"--{flag.replace('_', '-')} must be at least 1; got {getattr(args, flag)}")
    sock = bind(args.host, args.port)  # fail on a taken port before the (slow) model load
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    loaded, engine = start_engine(args, args.max_batch_size, args.max_queue)
    settings = api_settings(args)
    print(f"vlm serve: {settings.model_name} on {loaded.description}; "
          f"API at http://{args.host}:{args.port}/v1", flush=True)
    return run_server(make_app(engine, settings), sock, engine)


if __name__ == "__main__":
    sys.exit(main())
