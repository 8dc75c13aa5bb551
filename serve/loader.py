"""Loading the model for `vlm chat` / `vlm serve`: device, dtype and the default quantization."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from vlm.errors import VLMError

# On CUDA, LLMs at least this large load in 4-bit by default (a 7B LLM then fits a 24 GB card
# beside the vision tower); smaller ones, the 135M demo included, keep the precision they were
# evaluated in.
QUANTIZE_FROM_PARAMS = 1_000_000_000


@dataclass
class Loaded:
    model: object
    processor: object
    device: str
    dtype: str
    quantization: str  # "none", "4bit", "8bit"
    llm_parameters: int

    @property
    def description(self) -> str:
        quant = {"4bit": "NF4 4-bit (LLM only)", "8bit": "8-bit (LLM only)"}.get(self.quantization, "none")
        return f"{self.device} ({self.dtype}, quantization {quant})"


def llm_parameters(name_or_path: str) -> int:
    """Parameters of a checkpoint's LLM, counted from its config on the meta device (no weights read)."""
    import torch
    from transformers import AutoModelForCausalLM

    from vlm.loading import model_folder, read_vlm_config

    config, _ = read_vlm_config(model_folder(name_or_path))
    with torch.device("meta"):
        llm = AutoModelForCausalLM.from_config(config.text_config)
    return sum(p.numel() for p in llm.parameters())


def default_quantization(device: str, parameters: int) -> str:
    """4-bit on CUDA for LLMs of `QUANTIZE_FROM_PARAMS` or more, else none."""
    return "4bit" if device.startswith("cuda") and parameters >= QUANTIZE_FROM_PARAMS else "none"


def load_for_serving(args: argparse.Namespace) -> Loaded:
    """Load `args.model` for serving with `--device`, `--dtype` and `--quantization` (or their defaults)."""
    import torch

    from vlm.loading import default_device, default_dtype, load_pretrained
    from vlm.registry import DEFAULT_MODEL, resolve_model

    device = args.device or default_device()
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise VLMError(f"--device {device}: CUDA is not available on this machine")
    path = resolve_model(args.model or DEFAULT_MODEL)
    parameters = llm_parameters(path)
    quantization = args.quantization or default_quantization(device, parameters)
    dtype = getattr(torch, args.dtype) if args.dtype else default_dtype(device)
    model, processor = load_pretrained(path, quantization=quantization, device=device, dtype=dtype)
    return Loaded(model, processor, device, str(dtype).replace("torch.", ""), quantization, parameters)
