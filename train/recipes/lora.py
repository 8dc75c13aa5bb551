"""`lora`: peft LoRA on the LLM's attention and MLP projections (only inside `language_model`, never
the vision tower), plus the bridge unless `lora.train_bridge: false`."""

from __future__ import annotations

import re

import torch
from torch import nn

from vlm import load_pretrained
from vlm.errors import VLMError
from vlm.loading import is_peft

from ..config import BRIDGE_MODULES, TrainConfig
from . import register_recipe
from .base import Recipe, freeze_text_side, unfreeze

LLM_PREFIX = "language_model"


@register_recipe
class LoraRecipe(Recipe):
    """A LoRA adapter on the LLM (and the bridge) trains; the output is the adapter plus `bridge.safetensors`."""

    name = "lora"
    summary = "LoRA on the LLM's attention+MLP projections, plus the bridge (lora.train_bridge)"

    def load(self, device: str | None, dtype: torch.dtype):
        """As `Recipe.load`, but a LoRA output stays unmerged: its adapter trains on (a second stage)."""
        return load_pretrained(self.config.model, quantization=self.quantization, device=device, dtype=dtype)

    def select_trainable(self, model):
        # QLoRA: no peft `prepare_model_for_kbit_training`: it would upcast every non-quantized
        # weight (the frozen vision tower included) to fp32. The LoRA weights are fp32 (peft's
        # autocast_adapter_dtype), the 4-bit layers compute in the compute dtype.
        model = continue_lora(model, self.config) if is_peft(model) else wrap_lora(model, self.config)
        if self.config.lora.train_bridge:
            unfreeze(model.get_base_model(), BRIDGE_MODULES, "bridge")
            freeze_text_side(model.get_base_model())
        return model


def lora_target_pattern(model, target_modules: list[str] | str) -> str:
    """A peft `target_modules` regex matching only Linear layers inside the LLM.

    "auto" picks every Linear leaf in the LLM's decoder layers (attention and MLP projections;
    never the output head). Names that match nothing inside the LLM are a VLMError.
    """
    linear_names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if name.startswith(LLM_PREFIX + ".") and isinstance(module, nn.Linear) and _in_layer(name)
    }
    if target_modules == "auto":
        chosen = sorted(linear_names)
        if not chosen:
            raise VLMError("lora.target_modules=auto: the LLM has no Linear layers inside its decoder layers")
    else:
        chosen = list(target_modules)
        unknown = [t for t in chosen if t not in linear_names]
        if unknown:
            raise VLMError(
                f"lora.target_modules: {', '.join(unknown)} match no Linear layer of the LLM "
                f"(it has: {', '.join(sorted(linear_names)) or 'none'})"
            )
    return rf"{LLM_PREFIX}\..*\.(?:{'|'.join(re.escape(n) for n in chosen)})"


def wrap_lora(model, config: TrainConfig):
    """The model wrapped in a peft LoRA adapter on the LLM's projections."""
    from peft import LoraConfig, get_peft_model

    pattern = lora_target_pattern(model, config.lora.target_modules)
    lora_config = LoraConfig(
        r=config.lora.r,
        lora_alpha=config.lora.alpha,
        lora_dropout=config.lora.dropout,
        target_modules=pattern,
        bias="none",
    )
    return get_peft_model(model, lora_config)


def continue_lora(model, config: TrainConfig):
    """`config.model` is a LoRA output: its adapter (loaded onto its base) trains on as it is, so
    a second stage can refine the first one's adapter (`lora.r` and `lora.alpha` must match it)."""
    adapter = model.peft_config[model.active_adapter]
    for key, have in (("r", adapter.r), ("alpha", adapter.lora_alpha)):
        if getattr(config.lora, key) != have:
            raise VLMError(f"lora.{key}: {getattr(config.lora, key)}, but the adapter of {config.model} has "
                           f"{key} {have} (a LoRA output's adapter trains on as it is; set lora.{key}: {have})")
    adapter.inference_mode = False
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.requires_grad_(True)
    return model


def _in_layer(name: str) -> bool:
    # Decoder blocks live under `.layers.N.` (Llama, Mistral, OPT) or `.h.N.` (GPT-2 style).
    return re.search(r"\.(?:layers|h|blocks)\.\d+\.", name) is not None
