"""Which requests run the LoRA adapter: by default, conversations without images get the base LLM.

A LoRA fine-tuned on images (captions, VQA) also changes how the LLM answers plain text: the
demo's, trained on one-word answers, once answered "france" to "What is the capital of France?",
and even with text rehearsal rows in its mix it words most general answers differently from the
base model. With the adapter kept unmerged (a `vlm train` LoRA output, the demo), a request with
no image anywhere in its conversation runs with the adapter off, so text chat is exactly the base
LLM's. Requests with images run it on. `adapter_for_text=True` (`--adapter-for-text`) runs every
request through it, for adapters trained to change text chat too.

Rows of both kinds decode together in one batch through peft's mixed-adapter batches (the adapter
name `"__base__"` skips the LoRA for that row), the mechanism behind peft's own
`forward(..., adapter_names=...)`; a batch of one kind needs none of it. A merged model
(`vlm export --merge-lora`) has no adapter to turn off: every request runs what it holds.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from ..loading import is_peft
from .request import Request

BASE = "__base__"  # peft's adapter name for "no adapter" in a mixed batch


def _peft_adapter(model) -> str | None:
    """The active LoRA adapter's name, when `model` is a peft model with one."""
    if not is_peft(model) or model.peft_config[model.active_adapter].peft_type.value != "LORA":
        return None
    return model.active_adapter


class AdapterRouting:
    """Per request: the adapter it runs (`name`); per batch: the context its forward passes run in (`rows`)."""

    def __init__(self, model, adapter_for_text: bool = False):
        self.model = model
        self.adapter = _peft_adapter(model)
        self.adapter_for_text = adapter_for_text

    @property
    def routes(self) -> bool:
        """True when some requests run without the adapter."""
        return self.adapter is not None and not self.adapter_for_text

    def name(self, request: Request) -> str | None:
        """The adapter `request` runs: the model's, or `BASE` for one without images (None: no adapter)."""
        if not self.routes or request.images:
            return self.adapter
        return BASE

    @contextlib.contextmanager
    def rows(self, names: list[str | None]) -> Iterator[None]:
        """Forward passes in this context run each batch row with its adapter (`names[row]`)."""
        if not self.routes or all(n == self.adapter for n in names):
            yield
        elif all(n == BASE for n in names):
            with self.model.disable_adapter():
                yield
        else:
            # peft's forward(adapter_names=...) is this context around the base model's forward;
            # the engine calls the LLM inside the model directly, so it enters the context itself.
            with self.model._enable_peft_forward_hooks(adapter_names=list(names)):
                yield
