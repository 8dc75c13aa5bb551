"""Each row of a batch through its own LoRA, one pass of the model for the whole batch.

peft can run a batch whose rows use different adapters (`forward(adapter_names=...)`), but each
LoRA layer then gathers and scatters every adapter's rows by boolean masks, and turning adapters on
or off between batches (`set_adapter`, `disable_adapter`) walks every module of the model: rows
split over two fine-tunes decoded at half the merged model's speed (bench/serve.py --adapters 2,
figures in README.md). Here the batch's rows come in runs
of one adapter (the running batch keeps each fine-tune's rows together), and each LoRA layer adds
every run's low-rank update to the base layer's output in place, on views of that run's rows: two
matmuls per run, no copy, and no work at all for rows of the base.

While a batch runs, peft's own LoRA is off in every layer (the flag `disable_adapter()` sets) and
forward hooks add the rows' LoRA instead (for inference: no LoRA dropout); outside a batch the
model is a plain peft model again.
Only plain LoRA on Linear layers is served this way (no DoRA or other variants, no LoRA bias, no
embedding LoRA); `vlm export --merge-lora` serves the others.
"""

from __future__ import annotations

import contextlib
import itertools
import weakref
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import VLMError

BASE = "__base__"  # the adapter name of rows that run the base model (peft's name for it)

_Weights = tuple[torch.Tensor, torch.Tensor, float]  # one adapter's LoRA in one layer: A, B transposed, scaling


def _weights(name: str, layer) -> dict[str, _Weights]:
    """The LoRA weights of each adapter of `layer` (views of peft's parameters, not copies);
    `VLMError` for an adapter that is not plain LoRA on a Linear layer."""
    out = {}
    for adapter in layer.scaling:
        lora_a = layer.lora_A[adapter] if adapter in layer.lora_A else None
        lora_b = layer.lora_B[adapter] if adapter in layer.lora_B else None
        if (adapter in layer.lora_variant or not isinstance(lora_a, nn.Linear) or not isinstance(lora_b, nn.Linear)
                or lora_b.bias is not None):
            raise VLMError(f"LoRA adapter {adapter!r} on {name}: only plain LoRA on Linear layers (no DoRA, "
                           "LoRA bias or embedding LoRA) is served unmerged; merge it with vlm export --merge-lora")
        out[adapter] = (lora_a.weight, lora_b.weight.T, layer.scaling[adapter])
    return out


class LoraRows:
    """The per-row LoRA hooks of one peft model (`of(model)`: one per model, shared by every
    engine on it). `use(names)` runs forward passes with row `i` through adapter `names[i]`."""

    _models: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    @classmethod
    def of(cls, model) -> LoraRows:
        """The hooks of `model`, made on first use."""
        rows = cls._models.get(model)
        if rows is None:
            rows = cls._models[model] = cls(model)
        return rows

    def __init__(self, model):
        self._model = weakref.ref(model)  # the registry's value must not keep its key alive
        self.layers: dict[nn.Module, dict[str, _Weights]] = {}
        self._hooks: list = []
        self._adapters: tuple = ()  # the peft adapters `layers` were read for
        self._rows = 0  # batch rows in the running forward pass
        self._runs: list[tuple[str, int, int]] = []  # (adapter, first row, row after the last): no BASE runs
        self._all_one = False  # one run covers every row

    def refresh(self) -> None:
        """Read the adapters' weights from peft's layers again (after adapters are loaded or
        deleted); `VLMError` when one cannot run per row."""
        from peft.tuners.lora import LoraLayer

        model = self._model()
        layers = {module: _weights(name, module) for name, module in model.named_modules()
                  if isinstance(module, LoraLayer)}
        for handle in self._hooks:
            handle.remove()
        self.layers = layers
        self._hooks = [layer.register_forward_hook(self._add_lora, with_kwargs=True) for layer in layers]
        self._adapters = tuple(model.peft_config)

    @contextlib.contextmanager
    def use(self, names: Sequence[str]) -> Iterator[None]:
        """Forward passes in this context run batch row `i` through adapter `names[i]` (`BASE`:
        none). Inside peft's `disable_adapter()` every row runs the base."""
        if self._adapters != tuple(self._model().peft_config):
            self.refresh()
        layers = list(self.layers)
        if not layers or layers[0].disable_adapters:
            yield
            return
        self._rows, start = len(names), 0
        self._runs = []
        for adapter, run in itertools.groupby(names):
            stop = start + len(list(run))
            if adapter != BASE:
                self._runs.append((adapter, start, stop))
            start = stop
        self._all_one = self._runs == [(names[0], 0, len(names))]  # every row one adapter: no row mapping
        for layer in layers:
            layer._disable_adapters = True  # peft's switch that disable_adapter() flips, one layer at a time
        try:
            yield
        finally:
            for layer in layers:
                layer._disable_adapters = False
            self._runs = []

    def _add_lora(self, layer, args, kwargs, output: torch.Tensor) -> torch.Tensor | None:
        if not self._runs:
            return None
        weights = self.layers[layer]
        x = args[0] if args else kwargs["x"]
        x = x.reshape(-1, x.shape[-1])
        flat = output.view(-1, output.shape[-1])
        # Some LLMs (OPT's MLP) flatten (rows, tokens) before a layer: a row's tokens stay contiguous.
        tokens, odd = divmod(x.shape[0], self._rows)
        if odd and not self._all_one:  # tokens regrouped (an MoE's experts): rows cannot be told apart
            raise VLMError(f"LoRA on {type(layer).__name__} sees {x.shape[0]} rows for a batch of {self._rows}: "
                           "rows of different fine-tunes cannot be told apart in this model")
        for adapter, start, stop in self._runs:
            if adapter not in weights:
                continue
            A, B, scaling = weights[adapter]
            rows = slice(None) if self._all_one else slice(start * tokens, stop * tokens)
            low = F.linear(x[rows].to(A.dtype), A)
            if flat.dtype == B.dtype:
                flat[rows].addmm_(low, B, alpha=scaling)
            else:  # as peft: added in the LoRA's precision (float32 beside a bf16 base), rounded once
                flat[rows] = torch.addmm(flat[rows].to(B.dtype), low, B, alpha=scaling)
        return output
