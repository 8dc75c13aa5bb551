"""`qlora`: `lora` on an NF4 4-bit LLM (bitsandbytes; the vision tower stays in the compute dtype,
the Q-Former in full precision: `vlm.loading.NOT_QUANTIZED`)."""

from __future__ import annotations

from . import register_recipe
from .lora import LoraRecipe


@register_recipe
class QLoraRecipe(LoraRecipe):
    """LoRA on a 4-bit LLM: a 7B model trains on one 24 GB GPU."""

    name = "qlora"
    summary = "the same on a 4-bit (NF4) LLM; needs bitsandbytes"
    quantization = "4bit"
