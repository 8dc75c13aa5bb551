"""What the engine reads off a model (where generation stops, how long a context it takes) and
what it counts (`/metrics`)."""

from __future__ import annotations

import threading

# End-of-turn tokens of common chat templates: generation stops at them as well as at EOS.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")
DEFAULT_CONTEXT = 2048


def stop_token_ids(model, processor) -> list[int]:
    """EOS ids of the model and tokenizer, plus chat end-of-turn tokens when there is a chat template."""
    tokenizer = processor.tokenizer
    eos = model.generation_config.eos_token_id
    ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    if processor.has_chat_template:
        vocab = tokenizer.get_vocab()
        ids += [vocab[t] for t in END_OF_TURN_TOKENS if t in vocab]
    return sorted(set(ids))


def context_length(model, tokenizer) -> int:
    """Tokens the LLM reads at most (its position limit, or the tokenizer's when smaller)."""
    text_config = getattr(model.config, "text_config", model.config)
    n = getattr(text_config, "max_position_embeddings", None) or DEFAULT_CONTEXT
    tok_max = getattr(tokenizer, "model_max_length", None)
    if tok_max and tok_max < 1_000_000:  # tokenizers without a limit report ~1e30
        n = min(n, tok_max)
    return int(n)


class EngineStats(dict):
    """The engine's counters (a dict, read by `/metrics`), safe to bump from many threads."""

    def __init__(self):
        super().__init__(requests=0, completion_tokens=0, decode_steps=0, peak_batch=0, evicted=0, out_of_memory=0,
                         failed_requests=0)
        self._lock = threading.Lock()  # `generate` callers and the scheduler thread both count

    def bump(self, name: str, n: int = 1) -> None:
        """Add `n` to counter `name`."""
        with self._lock:
            self[name] += n

    def peak(self, rows: int) -> None:
        """Record a running batch of `rows` (the largest one is kept)."""
        with self._lock:
            self["peak_batch"] = max(self["peak_batch"], rows)
