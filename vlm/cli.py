"""The `vlm` command: a thin dispatcher that imports a subcommand's module only when it runs."""

from __future__ import annotations

import importlib
import logging
import os
import sys
import warnings

from .errors import VLMError

# name -> (module, one-line help). Each module has `main(argv: list[str]) -> int`.
SUBCOMMANDS = {
    "chat": ("vlm.serve.chat", "web chat about images (Gradio), with the OpenAI-compatible API under /v1"),
    "serve": ("vlm.serve.server", "the OpenAI-compatible API alone (/v1/chat/completions, /v1/models)"),
    "caption": ("vlm.serve.caption", "caption or ask questions about many images, to JSONL/CSV/txt"),
    "score": ("vlm.serve.score", "image-text agreement (BLIP-2 ITC/ITM) for many pairs, to JSONL/CSV"),
    "train": ("vlm.train.cli", "train: BLIP-2 stage 1, bridge, LoRA, QLoRA or full"),
    "eval": ("vlm.train.evaluate", "score a model on caption, VQA or retrieval data"),
    "export": ("vlm.train.export", "merge LoRA and write a standalone checkpoint"),
    "build": ("vlm.build", "compose a new model from a vision tower, an LLM and a Q-Former init"),
}

USAGE = "usage: vlm [--debug] [--verbose] {" + ",".join(SUBCOMMANDS) + "} ...\n\n" + "\n".join(
    f"  {name:<8} {help_}" for name, (_, help_) in SUBCOMMANDS.items()
) + ("\n\nRun `vlm COMMAND --help` for a command's options. --debug shows tracebacks; --verbose shows the "
     "libraries' own warnings and logs.")
# Libraries whose warnings and log chatter (deprecations, optional kernels they could not load)
# say nothing a user of `vlm` can act on.
QUIET_LOGGERS = ("transformers", "peft", "accelerate", "bitsandbytes", "kernels", "datasets", "httpx", "httpcore",
                 "urllib3")


def quiet_libraries() -> None:
    """Keep third-party warnings and logs off stderr (shown again with --verbose)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"(?!vlm)")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `vlm` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug, verbose = "--debug" in argv, "--verbose" in argv
    for flag in ("--debug", "--verbose"):
        if flag in argv:
            argv.remove(flag)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"vlm: unknown command {name!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    if not (debug or verbose):
        quiet_libraries()  # library chatter (load reports, deprecation notes) hides the line that matters
    try:
        module = importlib.import_module(SUBCOMMANDS[name][0])
        return int(module.main(rest) or 0)
    except VLMError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
