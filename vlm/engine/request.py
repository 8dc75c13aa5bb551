"""What the engine is asked for and what it gives back: settings, requests, completions, streams."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch
from PIL import Image

from ..errors import VLMError

logger = logging.getLogger(__name__)

FinishReason = Literal["stop", "length", "cancelled", "error"]


@dataclass(frozen=True)
class GenerationSettings:
    """Decoding settings of one request.

    `temperature` 0 is greedy. Greedy and sampling requests (temperature, top_p, top_k, seed,
    min/max new tokens, stop strings) are decoded together in the running batch; beam search,
    repetition or length penalties run through transformers' `generate` in batches of their own.
    """

    max_new_tokens: int = 256
    min_new_tokens: int = 0
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    num_beams: int = 1
    length_penalty: float = 1.0
    repetition_penalty: float = 1.0

    def __post_init__(self):
        checks = [
            ("max_new_tokens", self.max_new_tokens >= 1, "at least 1"),
            ("min_new_tokens", 0 <= self.min_new_tokens, "0 or more"),
            ("temperature", self.temperature >= 0, ">= 0"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("top_k", self.top_k >= 0, "0 or more"),
            ("num_beams", self.num_beams >= 1, "at least 1"),
            ("repetition_penalty", self.repetition_penalty > 0, "> 0"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise VLMError(f"{name} must be {rule}, got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def batchable(self) -> bool:
        """Whether the engine's own decode loop runs these settings (else transformers' generate)."""
        return self.num_beams == 1 and self.repetition_penalty == 1.0

    def generate_kwargs(self) -> dict:
        """The settings as `model.generate` keyword arguments."""
        kwargs = {"max_new_tokens": self.max_new_tokens, "min_new_tokens": self.min_new_tokens,
                  "num_beams": self.num_beams}
        if self.num_beams > 1:
            kwargs["length_penalty"] = self.length_penalty
        if self.repetition_penalty != 1.0:
            kwargs["repetition_penalty"] = self.repetition_penalty
        if self.greedy:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k or None)
        return kwargs


ImageInput = Image.Image | torch.Tensor  # a decoded RGB image, or its preprocessed pixels (3, H, W)


@dataclass
class Request:
    """One generation: a prompt (processor text) and its images, in reading order.

    `prompt` places each image at an `<image>` marker, or, with no marker, all images in front
    (BLIP-2's layout), exactly as `VLMProcessor` does. `qformer_text`: what an InstructBLIP-style
    Q-Former reads, one per image (default: the prompt without its markers).
    """

    prompt: str
    images: list[ImageInput] = field(default_factory=list)
    settings: GenerationSettings = field(default_factory=GenerationSettings)
    qformer_text: list[str] | None = None
    model: str | None = None  # a fine-tune the engine serves by name (`adapters.py`); None: its own model
    origin: str | None = None  # who sent it (a front door's name, e.g. "api"), for metrics labels


@dataclass
class Completion:
    """The outcome of a request. `text` is the reply as every path gives it (`sampling.final_text`):
    cut before its first stop string, without leading or trailing whitespace; a stream's pieces
    add up to it."""

    text: str
    finish_reason: FinishReason
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: BaseException | None = None
    warning: str | None = None  # e.g. an image unlike the model's training images (`vlm.novelty`)


class Stream:
    """A submitted request's live output: iterate for text pieces, then read `completion`.

    Thread-safe: the engine thread pushes, any one consumer thread iterates. `cancel()` stops
    this request at the next decode step without touching the others. Consumers that must not
    block a thread (an asyncio server) use `on_update` and `take` instead of iterating.

    Timings (`time.monotonic()`, for latency metrics): `submitted_at`; `admitted_at`, when the
    engine first took it from its queue; `first_token_at`, its first text piece (or its end, for a
    reply with tokens but no text); `finished_at`. `batch_size`: rows of the running batch when it
    joined, itself included (1 when it ran alone). Unset (None) where it never got that far.
    `finish_listeners` are called with the stream when it finishes, before its consumer sees the end.
    """

    def __init__(self, request: Request):
        self.request = request
        self._pieces: queue.Queue = queue.Queue()
        self._cancelled = threading.Event()
        self._drained = False  # the end marker was read: iterating again yields nothing
        self._listeners: list[Callable[[], None]] = []
        self._lock = threading.Lock()  # a listener added while the engine pushes sees that piece
        self.completion: Completion | None = None
        self.submitted_at = time.monotonic()
        self.admitted_at: float | None = None
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self.batch_size: int | None = None
        self.finish_listeners: list[Callable[[Stream], None]] = []

    # -- engine side -----------------------------------------------------------------------------
    def admitted(self) -> None:
        """The engine took this request from its queue (a resumed one keeps its first time)."""
        if self.admitted_at is None:
            self.admitted_at = time.monotonic()

    def push(self, piece: str) -> None:
        if piece:
            if self.first_token_at is None:
                self.first_token_at = time.monotonic()
            self._put(piece)

    def finish(self, completion: Completion) -> None:
        self.finished_at = time.monotonic()
        if self.first_token_at is None and completion.completion_tokens:
            self.first_token_at = self.finished_at
        self.completion = completion
        for listener in self.finish_listeners:
            # Before the end marker: whoever waits for the reply finds it counted. A broken
            # listener (metrics) must not fail the request or stop the engine thread.
            try:
                listener(self)
            except Exception:  # noqa: BLE001
                logger.exception("a finish listener failed")
        self._put(None)

    def _put(self, item: str | None) -> None:
        with self._lock:
            self._pieces.put(item)
            listeners = list(self._listeners)
        for listener in listeners:
            listener()

    # -- consumer side ---------------------------------------------------------------------------
    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def done(self) -> bool:
        """Whether the consumer has read everything up to the end (`completion` is then set)."""
        return self._drained

    def on_update(self, listener: Callable[[], None]) -> None:
        """Call `listener()` after every piece and at the end (and now, when some are already
        waiting). It runs in the engine's thread, so it must only hand over, e.g. with
        `loop.call_soon_threadsafe`; read the pieces with `take`."""
        with self._lock:
            self._listeners.append(listener)
            waiting = not self._pieces.empty()
        if waiting:
            listener()

    def take(self) -> list[str]:
        """The pieces pushed since the last read, without waiting (`done` tells whether the end
        was among them)."""
        pieces = []
        while not self._drained:
            try:
                piece = self._pieces.get_nowait()
            except queue.Empty:
                break
            if piece is None:
                self._drained = True
            else:
                pieces.append(piece)
        return pieces

    def _pieces_until_done(self) -> Iterator[str]:
        while not self._drained:
            piece = self._pieces.get()
            if piece is None:
                self._drained = True
                return
            yield piece

    def __iter__(self) -> Iterator[str]:
        """Text pieces as they are generated; ends when the request finishes. A request that
        failed raises its error here (after the pieces it produced)."""
        yield from self._pieces_until_done()
        if self.completion.error is not None:
            raise self.completion.error

    def result(self) -> Completion:
        """Wait for the end and return the completion (its `text` is the whole reply; a failed
        request's `error` is set, not raised)."""
        for _ in self._pieces_until_done():
            pass
        return self.completion
