"""One loading policy for every command that runs a model: device, dtype and default quantization.

`vlm chat`, `vlm serve`, `vlm caption`, `vlm score` and `vlm eval` take the same flags
(`add_load_arguments`) and load through `load_for_inference`, so a checkpoint loads the same way
whichever command runs it: on CUDA, an LLM of `QUANTIZE_FROM_PARAMS` parameters or more loads in
4-bit NF4 unless `--quantization none` (a 7B LLM then fits a 24 GB card beside the vision tower);
smaller ones (the 135M demo) and CPU runs keep full precision unless asked.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from .errors import VLMError

QUANTIZE_FROM_PARAMS = 1_000_000_000
DTYPES = ("float32", "bfloat16", "float16")
QUANTIZATIONS = ("4bit", "8bit", "none")


@dataclass
class Loaded:
    """A loaded model and how it was loaded (for start-up lines and page headers)."""

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


def add_load_arguments(p: argparse.ArgumentParser, model_help: str | None = None) -> None:
    """The loading flags every model-running command shares: --model, --device, --dtype, --quantization."""
    p.add_argument("--model", default=None, help=model_help or "checkpoint folder, hub id or registered name (vlm, "
                   "BLIP-2, InstructBLIP or a LoRA adapter folder); default: the offline demo model")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu... (default: CUDA when available)")
    p.add_argument("--dtype", default=None, choices=DTYPES,
                   help="weights dtype (default: bf16 on GPUs with native bf16, fp16 on older GPUs, fp32 on CPU)")
    p.add_argument("--quantization", default=None, choices=QUANTIZATIONS,
                   help="quantize the LLM with bitsandbytes (default: 4-bit NF4 on CUDA for LLMs of 1B+ "
                        "parameters, none otherwise)")


def llm_parameters(name_or_path: str) -> int:
    """Parameters of a checkpoint's LLM (0 without one), counted on the meta device: no weights read."""
    import torch
    from transformers import AutoModelForCausalLM

    from .image_text import ImageTextModel
    from .loading import model_class, model_folder, read_vlm_config

    config, _ = read_vlm_config(model_folder(name_or_path))
    if model_class(config) is ImageTextModel:  # a retrieval checkpoint: no LLM to quantize
        return 0
    with torch.device("meta"):
        llm = AutoModelForCausalLM.from_config(config.text_config)
    return sum(p.numel() for p in llm.parameters())


def default_quantization(device: str, parameters: int) -> str:
    """4-bit on CUDA for LLMs of `QUANTIZE_FROM_PARAMS` or more, else none."""
    return "4bit" if device.startswith("cuda") and parameters >= QUANTIZE_FROM_PARAMS else "none"


def load_for_inference(name: str | None = None, device: str | None = None, dtype: str | None = None,
                       quantization: str | None = None) -> Loaded:
    """Load a model with the policy above (`None`: the default of each)."""
    import torch

    from .loading import default_device, default_dtype, load_pretrained
    from .registry import DEFAULT_MODEL, resolve_model

    device = device or default_device()
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise VLMError(f"--device {device}: CUDA is not available on this machine")
    path = resolve_model(name or DEFAULT_MODEL)
    parameters = llm_parameters(path)
    quantization = quantization or default_quantization(device, parameters)
    torch_dtype = getattr(torch, dtype) if dtype else default_dtype(device)
    model, processor = load_pretrained(path, quantization=quantization, device=device, dtype=torch_dtype)
    return Loaded(model, processor, device, str(torch_dtype).replace("torch.", ""), quantization, parameters)


def load_from_args(args: argparse.Namespace, device: str | None = None) -> Loaded:
    """`load_for_inference` with the flags of `add_load_arguments` (`device` when the flag is unset)."""
    return load_for_inference(args.model, args.device or device, args.dtype, args.quantization)
