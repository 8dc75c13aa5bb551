"""Whole batches through transformers' `generate`, and out-of-memory splitting.

This is the engine's path for offline work (`vlm caption`, `vlm eval`: many requests with the
same settings, known up front) and for settings its own decode loop does not run (beam search,
repetition or length penalties): one `model.generate` call per batch, left-padded, with every
decoding strategy transformers has. Greedy results equal transformers' BLIP-2 on the same weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from ..errors import VLMError
from ..novelty import WARNING as NOVELTY_WARNING
from .adapters import AdapterRouting
from .encode import Encoder
from .request import Completion, Request
from .sampling import final_text


class OutOfMemory(VLMError):
    """A request that does not fit in the accelerator's memory even alone (the engine freed what
    it could and goes on with the others)."""


def free_memory() -> None:
    """Give cached allocator blocks back after an out-of-memory, before a retry."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def split_on_oom(run: Callable[[list[int]], list], indices: list[int], on_oom: Callable[[], None] = free_memory):
    """`run(indices)`, halving the batch on out-of-memory until single items fail alone.

    Returns one result per index: `run`'s output, or an `OutOfMemory` error for an item that does
    not fit even alone (a new one, not torch's: that one's traceback would keep the failed try's
    activations alive). `on_oom` (it empties the CUDA cache) runs after every out-of-memory, once
    the `except` block has ended, so the failed try's activations are freed first. Any other
    error propagates: a CUDA error such as a device-side assert leaves the device unusable, and
    retrying it would only repeat it.
    """
    alone = None
    try:
        return list(run(indices))
    except torch.OutOfMemoryError as e:
        if len(indices) == 1:
            alone = OutOfMemory(f"out of memory for this request even alone ({e})")
    on_oom()
    if alone is not None:
        return [alone]
    half = len(indices) // 2
    return split_on_oom(run, indices[:half], on_oom) + split_on_oom(run, indices[half:], on_oom)


@contextlib.contextmanager
def seeded(seed: int | None):
    """A context in which torch's random generators start from `seed` and are restored afterwards,
    so other code's randomness is untouched (nothing happens for None). Every CUDA device is
    forked, as `torch.manual_seed` reseeds them all."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
        torch.manual_seed(seed)
        yield


class BatchGenerator:
    """Runs lists of requests with equal settings through `model.generate`.

    `on_oom()` is called for every out-of-memory split (the engine counts them)."""

    def __init__(self, model, processor, encoder: Encoder, stop_token_ids: list[int], context_length: int,
                 on_oom: Callable[[], None] | None = None, routing: AdapterRouting | None = None):
        self.model, self.processor, self.encoder = model, processor, encoder
        self.routing = routing or AdapterRouting(model)
        self.stop_token_ids = stop_token_ids
        self.context_length = context_length
        self.oom_splits = 0
        self._count_oom = on_oom

    def _on_oom(self) -> None:
        self.oom_splits += 1
        if self._count_oom is not None:
            self._count_oom()
        self.encoder.cache.clear()
        free_memory()

    def run(self, requests: list[Request]) -> list[Completion]:
        """Completions in request order; a request whose prompt is empty or fills the LLM's context,
        or that does not fit in memory even alone, gets an error completion, the others their text."""
        results: list = self.encoder.prompt_problems(requests, self.context_length)
        todo = [i for i, error in enumerate(results) if error is None]
        done = split_on_oom(lambda idx: self._generate([requests[todo[i]] for i in idx]),
                            list(range(len(todo))), self._on_oom) if todo else []
        for i, result in zip(todo, done):
            results[i] = result
        return [r if isinstance(r, Completion) else Completion("", "error", error=r) for r in results]

    def _generate(self, requests: list[Request]) -> list[Completion]:
        """One `generate` call per adapter route (batches mixing routes are rare offline; the
        per-row LoRA of `lora_rows.py` would also follow beam search's expanded rows)."""
        names = [self.routing.name(r) for r in requests]
        out: list = [None] * len(requests)
        for name in dict.fromkeys(names):
            rows = [i for i, n in enumerate(names) if n == name]
            with self.routing.rows([name]):
                for i, completion in zip(rows, self._generate_batch([requests[i] for i in rows])):
                    out[i] = completion
        return out

    @torch.inference_mode()
    def _generate_batch(self, requests: list[Request]) -> list[Completion]:
        settings = requests[0].settings
        encoding, features, novel = self.encoder.encode_batch(requests)
        device = self.encoder.device
        input_ids = encoding["input_ids"].to(device)
        kwargs = settings.generate_kwargs()
        # No more tokens than the LLM's context holds, prompt included.
        kwargs["max_new_tokens"] = max(1, min(settings.max_new_tokens, self.context_length - input_ids.shape[1]))
        kwargs["min_new_tokens"] = min(kwargs["min_new_tokens"], kwargs["max_new_tokens"])
        if settings.stop:
            kwargs.update(stop_strings=list(settings.stop), tokenizer=self.processor.tokenizer)
        with seeded(settings.seed):
            out = self.model.generate(
                input_ids=input_ids, attention_mask=encoding["attention_mask"].to(device), image_features=features,
                eos_token_id=self.stop_token_ids, pad_token_id=self.processor.tokenizer.pad_token_id, **kwargs,
            )
        new_tokens = out[:, input_ids.shape[1]:].tolist()
        prompt_lengths = encoding["attention_mask"].sum(dim=1).tolist()
        completions = [self._completion(ids, n, settings, kwargs["max_new_tokens"])
                       for ids, n in zip(new_tokens, prompt_lengths)]
        for completion, (unlike, last_unlike), request in zip(completions, novel, requests):
            if unlike:
                completion.warning = NOVELTY_WARNING
            answer = self.encoder.novel_answer(request.model) if last_unlike else None
            if answer:  # the same answer the running batch gives (`engine.py`)
                completion.text, completion.finish_reason = answer, "stop"
        return completions

    def _completion(self, ids: list[int], prompt_tokens: int, settings, max_new_tokens: int) -> Completion:
        """One row of `generate`'s output; `max_new_tokens` is what this batch could generate
        (the request's, or less where the context had no more room)."""
        stops = set(self.stop_token_ids)
        end = next((i for i, t in enumerate(ids) if t in stops), None)
        kept = ids if end is None else ids[:end]
        text, stopped = final_text(self.processor.tokenizer.decode(kept, skip_special_tokens=True), settings.stop)
        if stopped:
            # The row stopped at its stop string; what follows is padding `generate` added while
            # other rows went on (an EOS where the pad token is EOS): not this row's tokens.
            completion_tokens = len(_strip_padding(kept, self.processor.tokenizer.pad_token_id))
        else:
            completion_tokens = len(kept) + (end is not None)
        reason = "length" if end is None and not stopped and len(ids) >= max_new_tokens else "stop"
        return Completion(text, reason, prompt_tokens=int(prompt_tokens), completion_tokens=completion_tokens)


def _strip_padding(ids: list[int], pad: int | None) -> list[int]:
    end = len(ids)
    while end and ids[end - 1] == pad:
        end -= 1
    return ids[:end]
