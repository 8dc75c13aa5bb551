"""Whole batches through transformers' `generate`, and out-of-memory splitting.

This is the engine's path for offline work (`vlm caption`, `vlm eval`: many requests with the
same settings, known up front) and for settings its own decode loop does not run (beam search,
repetition or length penalties): one `model.generate` call per batch, left-padded, with every
decoding strategy transformers has. Greedy results equal transformers' BLIP-2 on the same weights.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import VLMError
from ..novelty import WARNING as NOVELTY_WARNING
from .encode import Encoder
from .request import Completion, Request


class OutOfMemory(VLMError):
    """A request that does not fit in the accelerator's memory even alone (the engine freed what
    it could and goes on with the others)."""


def is_out_of_memory(error: BaseException) -> bool:
    """An allocation failure of the accelerator: the one model error a smaller batch can fix."""
    return isinstance(error, torch.OutOfMemoryError)


def free_memory() -> None:
    """Give cached allocator blocks back after an out-of-memory, before a retry."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def split_on_oom(run: Callable[[list[int]], list], indices: list[int], on_oom: Callable[[], None] = free_memory):
    """`run(indices)`, halving the batch on out-of-memory until single items fail alone.

    Returns one result per index: `run`'s output, or the out-of-memory error of an item that does
    not fit even alone. The retry happens after the `except` block has ended, so the failed try's
    activations (which its traceback holds) are freed first; `on_oom` runs in between (it empties
    the CUDA cache). Any other error propagates: a CUDA error such as a device-side assert leaves
    the device unusable, and retrying it would only repeat it.
    """
    try:
        return list(run(indices))
    except torch.OutOfMemoryError as e:
        if len(indices) == 1:
            return [e]
    on_oom()
    half = len(indices) // 2
    return split_on_oom(run, indices[:half], on_oom) + split_on_oom(run, indices[half:], on_oom)


class BatchGenerator:
    """Runs lists of requests with equal settings through `model.generate`."""

    def __init__(self, model, processor, encoder: Encoder, stop_token_ids: list[int], context_length: int):
        self.model, self.processor, self.encoder = model, processor, encoder
        self.stop_token_ids = stop_token_ids
        self.context_length = context_length
        self.oom_splits = 0

    def _on_oom(self) -> None:
        self.oom_splits += 1
        self.encoder.cache.clear()
        free_memory()

    def run(self, requests: list[Request]) -> list[Completion]:
        """Completions in request order; a request that does not fit in memory even alone gets an
        error completion, the others their text."""
        results = split_on_oom(lambda idx: self._generate([requests[i] for i in idx]),
                               list(range(len(requests))), self._on_oom)
        return [r if isinstance(r, Completion) else
                Completion("", "error", error=OutOfMemory(f"out of memory for this request even alone ({r})"))
                for r in results]

    @torch.inference_mode()
    def _generate(self, requests: list[Request]) -> list[Completion]:
        settings = requests[0].settings
        encoding, features = self.encoder.encode_batch(requests)
        device = self.encoder.device
        input_ids = encoding["input_ids"].to(device)
        kwargs = settings.generate_kwargs()
        # No more tokens than the LLM's context holds, prompt included.
        kwargs["max_new_tokens"] = max(1, min(settings.max_new_tokens, self.context_length - input_ids.shape[1]))
        kwargs["min_new_tokens"] = min(kwargs["min_new_tokens"], kwargs["max_new_tokens"])
        if settings.seed is not None:
            torch.manual_seed(settings.seed)
        if settings.stop:
            kwargs.update(stop_strings=list(settings.stop), tokenizer=self.processor.tokenizer)
        out = self.model.generate(
            input_ids=input_ids, attention_mask=encoding["attention_mask"].to(device), image_features=features,
            eos_token_id=self.stop_token_ids, pad_token_id=self.processor.tokenizer.pad_token_id, **kwargs,
        )
        new_tokens = out[:, input_ids.shape[1]:].tolist()
        prompt_lengths = encoding["attention_mask"].sum(dim=1).tolist()
        completions = [self._completion(ids, n, settings) for ids, n in zip(new_tokens, prompt_lengths)]
        if self.encoder.novelty is not None:
            for request, completion in zip(requests, completions):
                if request.images and self.encoder.any_novel(request.images):
                    completion.warning = NOVELTY_WARNING
        return completions

    def _completion(self, ids: list[int], prompt_tokens: int, settings) -> Completion:
        stops = set(self.stop_token_ids)
        end = next((i for i, t in enumerate(ids) if t in stops), None)
        kept = ids if end is None else ids[:end]
        text = self.processor.tokenizer.decode(kept, skip_special_tokens=True).strip()
        cut = min((text.find(s) for s in settings.stop if s in text), default=-1)
        if cut >= 0:  # OpenAI's convention: the stop string is not part of the text
            text = text[:cut].strip()
        reason = "length" if end is None and cut < 0 and len(ids) >= settings.max_new_tokens else "stop"
        completion_tokens = len(kept) + (end is not None)
        return Completion(text, reason, prompt_tokens=int(prompt_tokens), completion_tokens=completion_tokens)
