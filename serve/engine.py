"""`ChatEngine`: turns of a conversation -> prompt -> streamed tokens, one model, many sessions.

Images are encoded once per conversation (per session, by content) and passed to
`model.generate` as `image_features` (or `vision_features` for Q-Formers that read the
instruction), so a follow-up question about an earlier image costs no vision-tower pass.
Tokens stream through transformers' `TextIteratorStreamer`; a `threading.Event` stops a
generation early (the page's stop button, a client that went away).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from vlm.errors import VLMError

from .conversation import FeatureCache, Turn, file_digest, fit_to_context, turns_to_messages
from .uploads import open_upload

log = logging.getLogger(__name__)
# End-of-turn tokens of common chat templates: generation stops at them as well as at EOS.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")
DEFAULT_CONTEXT = 2048


@dataclass
class Prepared:
    """Model inputs for one reply, plus what trimming did."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    image_kwargs: dict
    dropped_turns: int
    max_new_tokens: int


class _StopOnEvent(StoppingCriteria):
    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class ChatEngine:
    """Answers conversations with one loaded `(model, processor)`; safe to call from threads."""

    def __init__(self, model, processor, cache: FeatureCache | None = None, stream_timeout: float = 300.0):
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.cache = cache or FeatureCache()
        self.stream_timeout = stream_timeout
        config = model.config
        self.reads_instruction = bool(getattr(config, "qformer_reads_instruction", False))
        self.context_length = self._context_length(config)
        vocab = self.tokenizer.get_vocab()
        eos = model.generation_config.eos_token_id
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        if self.tokenizer.eos_token_id is not None:
            eos.append(self.tokenizer.eos_token_id)
        eos += [vocab[t] for t in END_OF_TURN_TOKENS if t in vocab]
        self.eos_token_ids = sorted(set(eos))

    def _context_length(self, config) -> int:
        text_config = getattr(config, "text_config", config)
        n = getattr(text_config, "max_position_embeddings", None) or DEFAULT_CONTEXT
        tok_max = getattr(self.tokenizer, "model_max_length", None)
        if tok_max and tok_max < 1_000_000:  # tokenizers without a limit report ~1e30
            n = min(n, tok_max)
        return int(n)

    # -- prompt --------------------------------------------------------------------------------
    def prompt_text(self, turns: list[Turn], system_prompt: str | None = None) -> str:
        """The exact prompt text the model reads for `turns` (chat template applied)."""
        return self.processor.format_chat(turns_to_messages(turns, system_prompt))

    def _count_tokens(self, messages) -> int:
        return int(self.processor(text=self.processor.format_chat(messages))["input_ids"].shape[1])

    def prepare(
        self, session: str, turns: list[Turn], system_prompt: str | None = None, max_new_tokens: int = 256
    ) -> Prepared:
        """Trim `turns` to the context, encode their images (cached), and build model inputs.

        Raises `VLMError` for a last turn that cannot fit even alone, or an image that cannot
        be opened any more.
        """
        max_new_tokens = max(1, min(int(max_new_tokens), self.context_length // 2))
        budget = self.context_length - max_new_tokens
        turns, dropped = fit_to_context(turns, self._count_tokens, budget, system_prompt)
        prompt = self.prompt_text(turns, system_prompt)
        encoding = self.processor(text=prompt)
        length = encoding["input_ids"].shape[1]
        if length > budget:
            raise VLMError(
                f"this message needs {length} tokens (images included) but the model reads at most {budget} "
                f"before its {max_new_tokens}-token answer; shorten it or send fewer images"
            )
        if dropped:
            log.info("session %s: left out the %d oldest turn(s) to fit %d tokens", session[:8], dropped, budget)
        paths = [p for turn in turns for p in turn.images]
        instructions = [_instruction(turn) for turn in turns for _ in turn.images]
        image_kwargs = self.encode_images(session, paths, instructions) if paths else {}
        return Prepared(encoding["input_ids"], encoding["attention_mask"], image_kwargs, dropped, max_new_tokens)

    # -- images --------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, session: str, paths: list[str], instructions: list[str] | None = None) -> dict:
        """`generate` kwargs for `paths`, each image encoded at most once per session.

        BLIP-2-style models cache the final soft prompt (`image_features`); InstructBLIP-style
        ones cache the vision tower output and rerun only the Q-Former with each instruction.
        """
        features = []
        for path in paths:
            digest = file_digest(path)
            cached = self.cache.get(session, digest)
            if cached is None:
                cached = self._encode_one(path)
                self.cache.put(session, digest, cached)
            features.append(cached)
        stacked = torch.cat(features, dim=0)
        if not self.reads_instruction:
            return {"image_features": stacked}
        q = self.processor.qformer_tokenizer(
            instructions,
            padding=True,
            truncation=True,
            max_length=self.processor.qformer_max_length,
            return_tensors="pt",
        )
        return {
            "vision_features": stacked,
            "qformer_input_ids": q["input_ids"],
            "qformer_attention_mask": q["attention_mask"],
        }

    def _encode_one(self, path: str) -> torch.Tensor:
        image = open_upload(path)
        pixel_values = self.processor.image_processor([image], return_tensors="pt")["pixel_values"]
        vision = self.model.get_vision_features(pixel_values)
        if self.reads_instruction:
            return vision.detach()
        return self.model.get_image_features(vision_features=vision).detach()

    # -- generation ----------------------------------------------------------------------------
    def generation_kwargs(self, temperature: float, top_p: float, max_new_tokens: int) -> dict:
        """Decoding settings: greedy at temperature 0, nucleus sampling otherwise."""
        kwargs = {
            "max_new_tokens": int(max_new_tokens),
            "eos_token_id": self.eos_token_ids,
            "pad_token_id": self.tokenizer.pad_token_id,
        }
        if temperature and temperature > 0:
            kwargs.update(do_sample=True, temperature=float(temperature), top_p=float(top_p or 1.0))
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return kwargs

    def stream(
        self,
        prepared: Prepared,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: threading.Event | None = None,
        **extra_generate_kwargs,
    ) -> Iterator[str]:
        """Yield the reply so far after each new piece of text; stops early when `stop` is set.

        Closing the iterator (a cancelled request) also stops the generation thread.
        `extra_generate_kwargs` (e.g. `min_new_tokens`) go to `generate` as they are.
        """
        stop = stop or threading.Event()
        streamer = TextIteratorStreamer(
            self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=self.stream_timeout
        )
        kwargs = self.generation_kwargs(temperature, top_p, prepared.max_new_tokens)
        kwargs.update(
            input_ids=prepared.input_ids,
            attention_mask=prepared.attention_mask,
            streamer=streamer,
            stopping_criteria=StoppingCriteriaList([_StopOnEvent(stop)]),
            **prepared.image_kwargs,
            **extra_generate_kwargs,
        )
        failure: list[BaseException] = []

        def run() -> None:
            try:
                self.model.generate(**kwargs)
            except BaseException as e:  # noqa: BLE001 -- re-raised in the caller's thread below
                failure.append(e)
                streamer.end()

        thread = threading.Thread(target=run, name="vlm-generate", daemon=True)
        thread.start()
        text = ""
        try:
            for piece in streamer:
                if piece:
                    text += piece
                    yield text
        finally:
            stop.set()
            thread.join(timeout=self.stream_timeout)
        if failure:
            raise failure[0]

    def reply(self, session: str, turns: list[Turn], system_prompt: str | None = None, **kwargs) -> str:
        """The whole reply at once (for scripts and benchmarks)."""
        gen = {k: kwargs.pop(k) for k in ("temperature", "top_p") if k in kwargs}
        prepared = self.prepare(session, turns, system_prompt, **kwargs)
        text = ""
        for text in self.stream(prepared, **gen):
            pass
        return text.strip()


def _instruction(turn: Turn) -> str:
    return " ".join(p["text"] for p in turn.parts if p.get("type") == "text").strip()
