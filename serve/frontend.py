"""`ChatFrontend`: turns of a conversation -> one inference-engine request, for the chat page.

It renders the prompt the model was trained with (the chat template with an `<image>` marker
where each image was sent, or BLIP-2's prompts for LLMs without a template), drops the oldest
turns that no longer fit in the LLM's context, and opens the images only after checking that they
are uploads to this chat. Generation, batching with other users and the image-feature cache
belong to the shared `vlm.engine.InferenceEngine`.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch

from vlm.engine import GenerationSettings, InferenceEngine, Request, Stream
from vlm.errors import VLMError

from vlm.context import fit_context

from .conversation import Turn, prompt_tokens, render_prompt
from .uploads import MAX_UPLOAD_BYTES, ImageLimits, RequestImages, check_upload_file, display_name, open_upload

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """The request for one reply, plus what trimming did."""

    request: Request
    input_ids: torch.Tensor  # the prompt as the model reads it (image blocks in place)
    dropped_turns: int


class ChatFrontend:
    """Builds engine requests from chat turns; safe to call from Gradio's handler threads."""

    def __init__(self, engine: InferenceEngine, max_upload_bytes: int = MAX_UPLOAD_BYTES,
                 upload_dirs: list[str] | None = None, limits: ImageLimits | None = None):
        """`upload_dirs`: the only folders images may be read from (default: Gradio's upload
        folder, `gradio.utils.get_upload_folder()`); `max_upload_bytes`: the upload size limit;
        `limits`: pixels per image and per message, and the decode budget shared with the API."""
        self.engine = engine
        self.processor = engine.processor
        self.max_upload_bytes = int(max_upload_bytes)
        self.limits = limits or ImageLimits(max_bytes=self.max_upload_bytes)
        if upload_dirs is None:
            from gradio.utils import get_upload_folder  # where Gradio stores uploads and its file cache

            upload_dirs = [get_upload_folder()]
        self.upload_dirs = [str(d) for d in upload_dirs]

    @property
    def context_length(self) -> int:
        return self.engine.context_length

    def engine_model(self, name: str | None) -> str | None:
        """The engine's name for a model picked on the page (None: the served model itself)."""
        return name if name in self.engine.models() else None

    # -- prompt --------------------------------------------------------------------------------
    def prompt_text(self, turns: list[Turn], system_prompt: str | None = None, model: str | None = None) -> str:
        """The exact prompt text `model` (a fine-tune the engine serves; None: its own model) reads
        for `turns`, in the format it was trained with (see `conversation.render_prompt`)."""
        return render_prompt(self.engine.processor_for(model), turns, system_prompt)

    def _input_ids(self, turns: list[Turn], system_prompt: str | None, model: str | None = None) -> torch.Tensor:
        images = sum(len(t.images) for t in turns)
        return self.processor(text=self.prompt_text(turns, system_prompt, model), images_per_text=[images])["input_ids"]

    def prepare(self, turns: list[Turn], system_prompt: str | None = None,
                settings: GenerationSettings | None = None, model: str | None = None) -> Prepared:
        """Trim `turns` to the context, open their images, and build the request for `model` (a
        fine-tune the engine serves by name; None: its own model).

        Raises `VLMError` for a last turn that cannot fit even alone, or an image that cannot be
        opened, or images over the limits (`ImageBudgetExceeded`, `ServerBusyDecoding`), or a
        model the engine does not serve (`ModelNotFound`).
        """
        settings = settings or GenerationSettings()
        self.engine.check_model(model)
        processor = self.engine.processor_for(model)
        fitted = fit_context(turns, lambda kept: prompt_tokens(processor, kept, system_prompt),
                             self.context_length, settings.max_new_tokens, drop_oldest=True)
        turns, dropped = fitted.turns, fitted.dropped
        input_ids = self._input_ids(turns, system_prompt, model)
        if dropped:
            log.info("left out the %d oldest turn(s) to fit the context", dropped)
        reader = RequestImages(self.limits, self.engine.encoder.pixels)
        for path in (path for turn in turns for path in turn.images):
            self._add_upload(reader, path)
        images = self._named(reader.decode_all, turns)
        settings = dataclasses.replace(settings, max_new_tokens=fitted.max_new_tokens)
        request = Request(self.prompt_text(turns, system_prompt, model), images, settings, model=model, origin="chat")
        return Prepared(request, input_ids, dropped)

    def open_upload(self, path: str):
        """Open an upload as an RGB image after the folder and size checks; `VLMError` otherwise.

        Paths can come from a client-sent history: they are checked before a byte is read."""
        check_upload_file(path, self.upload_dirs, self.max_upload_bytes)
        return open_upload(path, max_bytes=self.max_upload_bytes)

    def _add_upload(self, reader: RequestImages, path: str) -> None:
        """An upload added to `reader` after the checks of `open_upload` (nothing decoded yet)."""
        check_upload_file(path, self.upload_dirs, self.max_upload_bytes)
        self._named(lambda: reader.add_file(path, display_name(path)), [Turn(images=[path])])

    @staticmethod
    def _named(work, turns: list[Turn]):
        """`work()`, with the server's paths in its `VLMError` replaced by the names users uploaded."""
        try:
            return work()
        except VLMError as e:
            message = str(e)
            for path in (path for turn in turns for path in turn.images):
                message = message.replace(str(path), display_name(path))
            raise type(e)(message) from None

    # -- generation ----------------------------------------------------------------------------
    def submit(self, prepared: Prepared) -> Stream:
        """Queue the reply on the engine (`EngineBusy` when its queue is full, `EngineFailed`
        when an earlier error stopped it)."""
        return self.engine.submit(prepared.request)

    def reply(self, turns: list[Turn], system_prompt: str | None = None, **settings) -> str:
        """The whole reply at once, stripped (for scripts and benchmarks); `settings` are
        `GenerationSettings` fields."""
        completion = self.submit(self.prepare(turns, system_prompt, GenerationSettings(**settings))).result()
        if completion.error is not None:
            raise completion.error
        return completion.text.strip()
