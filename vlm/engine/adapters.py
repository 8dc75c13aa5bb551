"""Which LoRA each request runs: the served model's own, a named fine-tune, or the base LLM.

One process serves one base model and any number of LoRA fine-tunes written by `vlm train`
(`vlm serve --adapter NAME=PATH`), chosen per request by name (`Request.model`). Each fine-tune
brings its peft adapter (LoRA on the LLM), its bridge (the Q-Former, query tokens and projection
it trained, `bridge.safetensors`), its prompt format (its processor) and its novelty statistics.
The base is held once: LoRA weights are small, and a fine-tune's bridge is swapped into the
model's own modules only while its images are encoded (`bridge`), under the engine's model lock.
Rows of different fine-tunes and of the base decode together in one batch, each row through its
own LoRA (`lora_rows.py`; the adapter name `"__base__"` skips the LoRA for that row).

A LoRA fine-tuned on images (captions, VQA) also changes how the LLM answers plain text: the
demo's, trained on one-word answers, once answered "france" to "What is the capital of France?".
So by default a request with no image anywhere in its conversation runs the base LLM, whatever
model it names; `adapter_for_text=True` (`--adapter-for-text`) runs the LoRA for those too. A
merged model (`vlm export --merge-lora`) has no adapter to turn off: every request runs what it holds.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..errors import VLMError
from ..files import ADAPTER_CONFIG
from ..loading import adapter_processor, is_peft, load_novelty, read_bridge
from ..novelty import NoveltyDetector
from .lora_rows import BASE, LoraRows
from .request import Request

SHARED = ("language_model.", "vision_model.")  # what every fine-tune shares: a bridge holds neither


def _peft_adapter(model) -> str | None:
    """The active LoRA adapter's name, when `model` is a peft model with one."""
    if not is_peft(model) or model.peft_config[model.active_adapter].peft_type.value != "LORA":
        return None
    return model.active_adapter


def _bare(model):
    return model.get_base_model() if is_peft(model) else model


@dataclass
class Served:
    """A LoRA fine-tune served under its own model name (`name`, also its peft adapter's name)."""

    name: str
    path: str
    bridge: dict[str, torch.Tensor]  # its trained bridge weights, by the model's parameter names
    processor: object  # its prompt format (question template, caption prompt, chat template)
    novelty: NoveltyDetector | None


class AdapterRouting:
    """Per request: the adapter it runs (`name`); per batch: the context its forward passes run in
    (`rows`); per image encoding: whose bridge (`bridge`). Fine-tunes are added with `add` and taken
    away with `remove` (under the engine's model lock: between forward passes)."""

    def __init__(self, model, adapter_for_text: bool = False):
        self.model = model
        self.adapter = _peft_adapter(model)  # the served model's own LoRA (None: the plain base)
        self.adapter_for_text = adapter_for_text
        self.served: dict[str, Served] = {}
        self.retiring: set[str] = set()  # removed, but still decoding the requests they had
        if is_peft(model):
            LoraRows.of(model).refresh()  # a LoRA that cannot be batched per row fails here, at start

    def available(self) -> list[str]:
        """The fine-tunes new requests may name."""
        return [name for name in self.served if name not in self.retiring]

    def lora(self, model_name: str | None) -> str | None:
        """The peft adapter of a served model name (None: the default model's own, if any)."""
        served = self.served.get(model_name)
        return served.name if served is not None else self.adapter

    def name(self, request: Request) -> str | None:
        """The adapter `request` runs: its model's LoRA, or `BASE` (the plain LLM: no LoRA, or a
        request without images); None when the model has no adapters at all."""
        lora = self.lora(request.model)
        if lora is None:
            return BASE if is_peft(self.model) else None
        return lora if request.images or self.adapter_for_text else BASE

    @contextlib.contextmanager
    def rows(self, names: list[str | None]) -> Iterator[None]:
        """Forward passes in this context run each batch row with its adapter (`names[row]`)."""
        if not is_peft(self.model):
            yield
            return
        with LoraRows.of(self.model).use(names):
            yield

    @contextlib.contextmanager
    def bridge(self, model_name: str | None) -> Iterator[None]:
        """In this context the model's bridge modules hold the weights of `model_name`'s fine-tune
        (the tensors are swapped, not copied; no other forward pass may run meanwhile)."""
        served = self.served.get(model_name)
        if served is None or not served.bridge:
            yield
            return
        params = dict(_bare(self.model).named_parameters())
        kept = {name: params[name].data for name in served.bridge}
        try:
            for name, value in served.bridge.items():
                params[name].data = value
            yield
        finally:
            for name, value in kept.items():
                params[name].data = value

    def novelty(self, model_name: str | None):
        """The novelty statistics for `model_name`'s images (a fine-tune's own, else the model's)."""
        served = self.served.get(model_name)
        if served is not None and served.novelty is not None:
            return served.novelty
        return getattr(self.model, "novelty", None)

    # -- adding and removing fine-tunes ------------------------------------------------------------
    def add(self, name: str, path: str, default_processor) -> None:
        """Serve the `vlm train` LoRA output at `path` as `name` (`VLMError` for a folder that is
        not one, a name taken, or a bridge that does not fit the base)."""
        if name in self.served or name == BASE:
            raise VLMError(f"--adapter {name}: that name is taken")
        if not os.path.isfile(os.path.join(path, ADAPTER_CONFIG)):
            raise VLMError(f"--adapter {name}={path}: not a LoRA output of vlm train (no {ADAPTER_CONFIG})")
        bridge = self._read_bridge(name, path)
        from peft import PeftModel

        if is_peft(self.model):
            self.model.load_adapter(path, adapter_name=name)
        else:
            self.model = PeftModel.from_pretrained(self.model, path, adapter_name=name)
            self.model.eval()
        try:
            LoraRows.of(self.model).refresh()
        except VLMError as e:  # a LoRA the rows cannot run (DoRA, LoRA bias, embedding LoRA): take it out again
            self.model.delete_adapter(name)
            LoraRows.of(self.model).refresh()
            raise VLMError(f"--adapter {name}={path}: {e}") from None
        self.served[name] = Served(name, path, bridge, adapter_processor(path, default_processor),
                                   load_novelty(path, next(self.model.parameters()).device))

    def remove(self, name: str) -> None:
        """Stop serving `name` and free its LoRA (no request may be using it)."""
        self.served.pop(name)
        self.retiring.discard(name)
        if name == self.model.active_adapter and len(self.model.peft_config) > 1:
            self.model.set_adapter(next(n for n in self.model.peft_config if n != name))
        self.model.delete_adapter(name)
        LoraRows.of(self.model).refresh()

    def _read_bridge(self, name: str, path: str) -> dict[str, torch.Tensor]:
        """The fine-tune's bridge, checked against the base (`read_bridge`); it may hold only
        parameters the fine-tunes do not share (never the LLM or the vision tower)."""
        bridge = read_bridge(_bare(self.model), path, f"base model of --adapter {name}") or {}
        params = dict(_bare(self.model).named_parameters())
        shared = [k for k in bridge if k.startswith(SHARED) or k not in params]
        if shared:
            raise VLMError(f"--adapter {name}: {path} trained weights the fine-tunes share ({shared[0]}...); serve "
                           "it alone, or merge it with vlm export --merge-lora")
        return bridge

