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

from .conversation import FeatureCache, Turn, file_digest, fit_to_context, plain_prompt, turns_to_messages
from .uploads import MAX_UPLOAD_BYTES, check_upload_file, open_upload

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

    def __init__(
        self,
        model,
        processor,
        cache: FeatureCache | None = None,
        stream_timeout: float = 300.0,
        max_upload_bytes: int = MAX_UPLOAD_BYTES,
        upload_dirs: list[str] | None = None,
    ):
        """`upload_dirs`: the only folders images may be read from (default: Gradio's upload
        folder, `gradio.utils.get_upload_folder()`); `max_upload_bytes`: the upload size limit."""
        self.model = model
        self.processor = processor
        self.max_upload_bytes = int(max_upload_bytes)
        if upload_dirs is None:
            from gradio.utils import get_upload_folder  # where Gradio stores uploads and its file cache

            upload_dirs = [get_upload_folder()]
        self.upload_dirs = [str(d) for d in upload_dirs]
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
        """The exact prompt text the model reads for `turns`.

        With a chat template: the template, an `<image>` marker where each image was sent.
        Without one (official BLIP-2/InstructBLIP LLMs): the prompts the model was trained with
        (`processor.format_question`, `processor.caption_prompt`), no markers, so the processor
        puts the images in front, before BOS, as BLIP-2 saw them.
        """
        if self.processor.has_chat_template:
            return self.processor.format_chat(turns_to_messages(turns, system_prompt))
        return plain_prompt(
            turns,
            self.processor.format_question,
            self.processor.caption_prompt or "",
            self.processor.image_token,
            system_prompt,
        )

    def encode_prompt(self, prompt: str, num_images: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`input_ids, attention_mask` for `prompt` with `num_images` image blocks, laid out as
        `processor(images, text=prompt)` lays them out (at the markers, or in front without any)."""
        encoding = self.processor(text=prompt)
        input_ids, mask = encoding["input_ids"], encoding["attention_mask"]
        if num_images and self.processor.image_token not in prompt:
            block = torch.full((1, num_images * self.processor.num_query_tokens), self.processor.image_token_id)
            input_ids = torch.cat([block.to(input_ids.dtype), input_ids], dim=1)
            mask = torch.cat([torch.ones_like(block, dtype=mask.dtype), mask], dim=1)
        return input_ids, mask

    def _count_tokens(self, turns: list[Turn], system_prompt: str | None) -> int:
        n_images = sum(len(t.images) for t in turns)
        return int(self.encode_prompt(self.prompt_text(turns, system_prompt), n_images)[0].shape[1])

    def prepare(
        self, session: str, turns: list[Turn], system_prompt: str | None = None, max_new_tokens: int = 256
    ) -> Prepared:
        """Trim `turns` to the context, encode their images (cached), and build model inputs.

        Raises `VLMError` for a last turn that cannot fit even alone, or an image that cannot
        be opened any more.
        """
        max_new_tokens = max(1, min(int(max_new_tokens), self.context_length // 2))
        budget = self.context_length - max_new_tokens
        turns, dropped = fit_to_context(turns, lambda kept: self._count_tokens(kept, system_prompt), budget)
        paths = [p for turn in turns for p in turn.images]
        prompt = self.prompt_text(turns, system_prompt)
        input_ids, attention_mask = self.encode_prompt(prompt, len(paths))
        length = input_ids.shape[1]
        if length > budget:
            raise VLMError(
                f"this message needs {length} tokens (images included) but the model reads at most {budget} "
                f"before its {max_new_tokens}-token answer; shorten it or send fewer images"
            )
        if dropped:
            log.info("session %s: left out the %d oldest turn(s) to fit %d tokens", session[:8], dropped, budget)
        # The Q-Former reads what the processor gives it for this prompt by default (as in
        # training, captioning and eval): the whole rendered prompt without image markers.
        instructions = [self.processor.qformer_instruction(prompt)] * len(paths)
        image_kwargs = self.encode_images(session, paths, instructions) if paths else {}
        return Prepared(input_ids, attention_mask, image_kwargs, dropped, max_new_tokens)

    # -- images --------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, session: str, paths: list[str], instructions: list[str] | None = None) -> dict:
        """`generate` kwargs for `paths`, each image encoded at most once per session.

        BLIP-2-style models cache the final soft prompt (`image_features`); InstructBLIP-style
        ones cache the vision tower output and rerun only the Q-Former with each instruction.
        """
        features = []
        for path in paths:
            # Paths can come from a client-sent history: check them before reading a byte.
            check_upload_file(path, self.upload_dirs, self.max_upload_bytes)
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

    def open_upload(self, path: str):
        """Open an upload as an RGB image after the folder and size checks; `VLMError` otherwise."""
        check_upload_file(path, self.upload_dirs, self.max_upload_bytes)
        return open_upload(path, max_bytes=self.max_upload_bytes)

    def _encode_one(self, path: str) -> torch.Tensor:
        image = self.open_upload(path)
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
