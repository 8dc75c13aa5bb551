"""`InferenceEngine`: one model, many callers; the chat, the API, `vlm caption` and `vlm eval` run on it.

Two ways in:

- `generate(requests)`: offline work known up front (captioning, eval). Requests with the same
  settings go through `model.generate` in batches (`batches.py`), in the caller's thread.
- `submit(request) -> Stream`: online serving. A scheduler thread keeps a running batch
  (`decode.py`); a request that arrives while others decode joins at the next step, streams its
  own tokens and stops on its own end of sequence, stop strings, `max_new_tokens` or
  cancellation. A request with settings the decode loop does not run (beam search, repetition
  penalty) goes through transformers' `generate` alone, in the scheduler thread between two
  steps: the running batch waits for it, and its text comes in one piece.

Both share the image feature cache (`cache.py`): a picture seen before costs no vision-tower pass.
Out-of-memory is handled here, once: offline batches are split and retried; in the running batch
the newest half of the sequences is evicted and later resumed from the tokens it had; a request
whose prefill does not fit waits until the batch is smaller than when it failed.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections import deque
from collections.abc import Callable, Iterable

import torch

from ..errors import VLMError
from ..novelty import WARNING as NOVELTY_WARNING
from .adapters import AdapterRouting
from .batches import BatchGenerator, OutOfMemory, free_memory
from .cache import FeatureCache
from .decode import RunningBatch, Sequence
from .embed import Embedder
from .encode import Encoder, prompt_problem
from .failures import EngineBusy, EngineFailed, ModelNotFound, RequestFailed, is_device_fault
from .limits import EngineStats, context_length, stop_token_ids
from .request import Completion, Request, Stream

logger = logging.getLogger(__name__)

class InferenceEngine:
    """Batched generation for one loaded `(model, processor)`; safe to call from many threads.

    Args:
        max_batch_size: sequences decoded together (online) / requests per `generate` call (offline).
        feature_cache_bytes: memory for encoded images (on the model's device).
        max_waiting: requests allowed to wait beyond the free places of the running batch (a
            request that can join it at once never counts); `submit` raises `EngineBusy` past
            that. 0: nothing waits.
        adapter_for_text: run requests without images through the model's LoRA adapter too
            (default: they run on the base LLM, `adapters.py`).
        on_failure: called (in the engine's thread) once the engine has stopped for good after a
            device fault, so a server can exit non-zero and its supervisor restart it.
    """

    def __init__(self, model, processor, max_batch_size: int = 16, feature_cache_bytes: int = 1 << 30,
                 max_waiting: int = 64, adapter_for_text: bool = False,
                 on_failure: Callable[[], None] | None = None):
        if max_batch_size < 1 or max_waiting < 0:
            raise VLMError(f"max_batch_size must be >= 1 and max_waiting >= 0, got {max_batch_size}, {max_waiting}")
        self.model, self.processor = model, processor
        self.max_batch_size, self.max_waiting = int(max_batch_size), int(max_waiting)
        self.routing = AdapterRouting(model, adapter_for_text)
        self.encoder = Encoder(model, processor, FeatureCache(feature_cache_bytes), self.routing)
        # An image-text model (a retrieval checkpoint: no LLM) serves embeddings and scores only.
        self.generates = getattr(model, "language_model", None) is not None
        self.stop_token_ids = stop_token_ids(model, processor) if self.generates else []
        self.context_length = context_length(model, processor.tokenizer) if self.generates else 0
        self.stats = EngineStats()
        # The counter is the stats object's method, not a closure over the engine: engine and model
        # would keep each other alive after `del` until the garbage collector ran (issue 28).
        self.batches = BatchGenerator(model, processor, self.encoder, self.stop_token_ids, self.context_length,
                                      on_oom=functools.partial(self.stats.bump, "out_of_memory"),
                                      routing=self.routing)
        self._model_lock = threading.RLock()  # one forward pass at a time, online or offline
        self.embeddings = Embedder(model, processor, self.encoder, self.routing, self._model_lock)
        self._wake = threading.Condition()  # guards _waiting, _admitting, _closed and failure
        self._waiting: deque[Stream | Sequence] = deque()
        self._running = RunningBatch(model, self.routing)
        self._thread: threading.Thread | None = None
        self._admitting: Stream | Sequence | None = None  # taken from the queue, not yet running
        # Rows the running batch may grow to: after a prefill ran out of memory, fewer than at
        # that moment, until the batch empties (else the waiting request would retry every step).
        self._admit_limit = self.max_batch_size
        self._closed = False
        self.failure: BaseException | None = None
        self.on_failure = on_failure
        self._finish_listeners: list[Callable[[Stream], None]] = []

    @property
    def feature_cache(self) -> FeatureCache:
        return self.encoder.cache

    # -- offline -------------------------------------------------------------------------------
    def generate(self, requests: Iterable[Request], batch_size: int | None = None,
                 on_batch: Callable[[int], None] | None = None) -> list[Completion]:
        """Completions for `requests`, in order. Greedy and beam-search requests run `batch_size`
        (default `max_batch_size`) per `model.generate` call (transformers' own decoding); sampled
        ones decode in the running batch, each with its own random generator, so a seeded request
        gives the text `submit` gives, whatever its batch mates. `on_batch(n)` is called after each
        batch (progress bars)."""
        requests = list(requests)
        self._check_generates()
        for request in requests:
            self.check_model(request.model)
        size = batch_size or self.max_batch_size
        out: list[Completion | None] = [None] * len(requests)
        sampled = {}
        for i, request in enumerate(requests):
            if request.settings.batchable and not request.settings.greedy:
                sampled[i] = self._enqueue(Stream(request), bounded=False)
        groups: dict = {}
        for i, request in enumerate(requests):  # equal settings share batches, order kept within
            if i not in sampled:
                groups.setdefault(request.settings, []).append(i)
        for indices in groups.values():
            for start in range(0, len(indices), size):
                chunk = indices[start:start + size]
                with self._model_lock:
                    if self.model is None:
                        raise VLMError("the inference engine is closed")
                    results = self.batches.run([requests[i] for i in chunk])
                for i, result in zip(chunk, results):
                    out[i] = result
                if on_batch is not None:
                    on_batch(len(chunk))
        for i, stream in sampled.items():
            out[i] = stream.result()
        if sampled and on_batch is not None:
            on_batch(len(sampled))
        self._bump("requests", len(requests))
        return out

    # -- online --------------------------------------------------------------------------------
    def add_finish_listener(self, listener: Callable[[Stream], None]) -> None:
        """Call `listener(stream)` as each request queued from now on finishes (its timings and
        `completion` set), in the engine's thread: it must only record or hand over, never block."""
        self._finish_listeners.append(listener)

    def submit(self, request: Request) -> Stream:
        """Queue `request` for the running batch; iterate the returned `Stream` for its text.

        Raises `EngineBusy` when `max_waiting` requests already wait beyond the batch's free
        places, `EngineFailed` after an unrecoverable error, `VLMError` once closed."""
        stream = self._enqueue(Stream(request), bounded=True)
        self._bump("requests")
        return stream

    def _enqueue(self, stream: Stream, bounded: bool) -> Stream:
        """Queue `stream` for the running batch (`bounded`: refused past `max_waiting`)."""
        self._check_generates()
        self.check_model(stream.request.model)
        with self._wake:
            if self.failure is not None:
                raise EngineFailed(f"the inference engine stopped after an error: {self.failure}")
            if self._closed:
                raise VLMError("the inference engine is closed")
            beyond = self._in_flight() - self.max_batch_size  # waiting for a place, not for a step
            if bounded and beyond >= self.max_waiting:
                raise EngineBusy(f"the server is busy ({beyond} requests waiting); try again shortly")
            stream.finish_listeners.extend(self._finish_listeners)
            self._waiting.append(stream)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="vlm-engine", daemon=True)
                self._thread.start()
            self._wake.notify()
        return stream

    # -- serving several fine-tunes ------------------------------------------------------------------
    def models(self) -> list[str]:
        """The fine-tunes requests may name (`Request.model`), besides the engine's own model (None)."""
        return self.routing.available()

    def processor_for(self, name: str | None):
        """The processor whose prompt format `name` was trained with (the engine's own for None)."""
        served = self.routing.served.get(name)
        return served.processor if served is not None else self.processor

    def _check_generates(self) -> None:
        if not self.generates:
            raise VLMError("this model has no language model to answer with: it serves embeddings and image-text "
                           "scores only")

    def check_model(self, name: str | None) -> None:
        """`ModelNotFound` unless requests may name `name`."""
        if name is not None and name not in self.routing.available():
            raise ModelNotFound(f"the model {name!r} does not exist")

    def add_adapter(self, name: str, path: str) -> None:
        """Serve the `vlm train` LoRA output at `path` as model `name` (loaded between decode steps)."""
        with self._model_lock:
            if self.model is None:
                raise VLMError("the inference engine is closed")
            self.routing.add(name, path, self.processor)

    def remove_adapter(self, name: str) -> None:
        """Stop serving `name`: new requests for it get `ModelNotFound` at once; its LoRA and bridge
        are freed as soon as the requests already using it have finished."""
        with self._wake:
            self.check_model(name)
            self.routing.retiring.add(name)
        with self._model_lock:
            self._retire()

    def _retire(self) -> None:
        """Free the removed fine-tunes no request in flight uses any more (call with the model lock)."""
        with self._wake:
            items = [*self._waiting, *([self._admitting] if self._admitting is not None else []), *self._running.seqs]
            in_use = {_stream(item).request.model for item in items}
        for name in self.routing.retiring - in_use:
            self.routing.remove(name)

    def _in_flight(self) -> int:
        """Requests submitted and not finished (call with `_wake` held)."""
        return len(self._waiting) + len(self._running) + (self._admitting is not None)

    def close(self) -> None:
        """Stop the scheduler thread (waiting and running requests end as cancelled) and let go of
        the model: whoever still holds the engine (an app's routes, a page's callbacks), the
        model's memory is back once its last other owner drops it. Nothing runs after this."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=60)
        if self._thread is None or not self._thread.is_alive():  # a step still running needs the model
            with self._model_lock:  # after an offline batch in another thread
                self._release_model()

    def _release_model(self) -> None:
        """Drop every reference to the model and the image features cached on its device."""
        self.feature_cache.clear()
        for part in (self, self.encoder, self.batches, self.routing, self._running, self.embeddings):
            part.model = None
        self._running.llm = None
        self.routing.served.clear()  # the fine-tunes' bridges and statistics

    @property
    def queue_full(self) -> bool:
        """Whether `submit` would refuse a request now: `max_waiting` already wait beyond the batch."""
        with self._wake:
            return self._in_flight() - self.max_batch_size >= self.max_waiting

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    def _loop(self) -> None:
        try:
            while True:
                with self._wake:
                    while not self._closed and not self._waiting and not len(self._running):
                        self._wake.wait()
                    if self._closed:
                        break
                with self._model_lock:
                    self._admit()
                    if len(self._running):
                        self._step()
                    if self.routing.retiring:
                        self._retire()
        except BaseException as e:  # noqa: BLE001 - a dead device or an engine bug: fail every request loudly
            logger.exception("the inference engine stopped")
            with self._wake:  # from here on `submit` refuses: nothing is queued after `_end_all`
                self.failure = e
                self._closed = True
        self._end_all(self.failure)
        if self.failure is not None and self.on_failure is not None:
            self.on_failure()

    def _end_all(self, error: BaseException | None) -> None:
        with self._wake:
            waiting, self._waiting = list(self._waiting), deque()
            if self._admitting is not None:  # the request whose prefill failed
                waiting.insert(0, self._admitting)
                self._admitting = None
        for item in waiting:
            _stream(item).finish(_unfinished(item, "error" if error else "cancelled", _failed(error)))
        for seq in self._running.remove(list(range(len(self._running)))):
            seq.stream.finish(seq.completion("error" if error else "cancelled", _failed(error)))

    # -- scheduling ----------------------------------------------------------------------------
    def _admit(self) -> None:
        """Move waiting requests into the running batch while there is room."""
        if not len(self._running):
            self._admit_limit = self.max_batch_size  # an empty batch: memory is back, try afresh
        while len(self._running) < self._admit_limit:
            with self._wake:
                if not self._waiting:
                    return
                item = self._admitting = self._waiting.popleft()
            stream = _stream(item)
            stream.admitted()
            if stream.cancelled:
                stream.finish(_unfinished(item, "cancelled"))
            elif not stream.request.settings.batchable:
                self._run_alone(stream)
            elif not self._prefill(item):
                self._admitting = None
                return
            self._admitting = None

    def _prefill(self, item: Stream | Sequence) -> bool:
        """Encode and prefill one request; False when memory ran out and it must wait."""
        seq = item if isinstance(item, Sequence) else None
        try:
            if seq is None:
                seq = self._sequence(item)
                if seq is None:
                    return True
            done = self._running.prefill(seq)
            seq.stream.batch_size = len(self._running) + done  # the rows it joined, itself included
            if done:
                seq.stream.finish(seq.completion())
                self._count(seq)
            self._peak(len(self._running))
            return True
        except torch.OutOfMemoryError:
            pass
        except Exception as e:  # noqa: BLE001 - one request's failure must not stop the others
            item = seq if seq is not None else item
            _stream(item).finish(_unfinished(item, "error", self._request_failed(e)))
            return True
        self._out_of_memory()
        # A sequence that was made waits as itself: its first token may be streamed already.
        item = seq if seq is not None else item
        if not len(self._running):  # nothing to wait for: it does not fit even alone
            error = OutOfMemory("out of memory for this request even alone")
            _stream(item).finish(_unfinished(item, "error", error))
            return True
        self._admit_limit = len(self._running)  # no new prefill until the batch is smaller than now
        self._requeue([item])
        return False

    def _sequence(self, stream: Stream) -> Sequence | None:
        """The request encoded (images through the cache); None when its input is bad or does
        not fit in the context (the stream then ends with the error)."""
        try:
            encoded = self.encoder.encode(stream.request)
        except VLMError as e:  # bad input (an empty prompt, markers that do not match the images...)
            stream.finish(Completion("", "error", error=e))
            return None
        answer = self.encoder.novel_answer(stream.request.model) if encoded.last_novel else None
        if answer:  # a model that says so rather than invent
            stream.push(answer)
            stream.finish(Completion(answer, "stop", len(encoded.input_ids), 0, warning=NOVELTY_WARNING))
            return None
        too_long = prompt_problem(len(encoded.input_ids), self.context_length)
        if too_long is not None:  # its positions would run past the LLM's: an index error, or a CUDA assert
            stream.finish(Completion("", "error", prompt_tokens=len(encoded.input_ids), error=too_long))
            return None
        return Sequence(stream, encoded, self.stop_token_ids, self.processor.tokenizer, self.context_length,
                        adapter=self.routing.name(stream.request))

    def _run_alone(self, stream: Stream) -> None:
        """A request the decode loop cannot run, through `generate` (the running batch waits)."""
        stream.batch_size = 1
        try:
            completion = self.batches.run([stream.request])[0]
        except VLMError as e:  # its input is bad: it fails alone, as in `_sequence`
            completion = Completion("", "error", error=e)
        except Exception as e:  # noqa: BLE001 - as in `_prefill`: this request fails, the engine goes on
            completion = Completion("", "error", error=self._request_failed(e))
        stream.push(completion.text)
        stream.finish(completion)
        self._bump("completion_tokens", completion.completion_tokens)

    def _step(self) -> None:
        cancelled = [i for i, seq in enumerate(self._running.seqs) if seq.stream.cancelled]
        for seq in self._remove(cancelled):
            seq.stream.finish(seq.completion("cancelled"))
        if not len(self._running):
            return
        try:
            finished = self._running.step()
        except torch.OutOfMemoryError:
            finished = None
        except Exception as e:  # noqa: BLE001 - which row broke the step is unknown: the rows of this step fail
            error = self._request_failed(e)
            for seq in self._running.remove(list(range(len(self._running)))):
                seq.stream.finish(seq.completion("error", error))
            return
        if finished is None:
            self._evict_half()
            return
        self._bump("decode_steps")
        for seq in self._remove(finished):
            seq.stream.finish(seq.completion())
            self._count(seq)

    def _remove(self, rows: list[int]) -> list[Sequence]:
        """`rows` out of the running batch. Keeping the others copies their KV cache; when that
        runs out of memory, every row leaves (which copies nothing and frees the cache) and the
        others wait to resume from their tokens."""
        try:
            return self._running.remove(rows)
        except torch.OutOfMemoryError:
            pass
        self._out_of_memory()
        everyone = self._running.remove(list(range(len(self._running))))
        leaving = set(rows)
        others = [seq for i, seq in enumerate(everyone) if i not in leaving]
        self._bump("evicted", len(others))
        self._requeue(others)
        return [everyone[i] for i in rows]

    def _evict_half(self) -> None:
        """After an out-of-memory decode step: the newest half waits and resumes later."""
        self._out_of_memory()
        rows = len(self._running)
        if rows == 1:
            (seq,) = self._running.remove([0])
            seq.stream.finish(seq.completion("error", OutOfMemory("out of memory while generating this reply alone")))
            return
        self._admit_limit = min(self._admit_limit, rows)  # growing back to `rows` would fail again
        evicted = self._remove(list(range(rows - rows // 2, rows)))
        self._bump("evicted", len(evicted))
        self._requeue(evicted)

    def _requeue(self, items: list[Stream | Sequence]) -> None:
        """Put `items` back at the head of the queue, in order (they were there first)."""
        with self._wake:
            self._waiting.extendleft(reversed(items))

    def _request_failed(self, error: Exception) -> RequestFailed:
        """The error a request gets for an unexpected failure, logged with its traceback; a device
        fault is raised again instead, and stops the engine."""
        if is_device_fault(error):
            raise error
        logger.error("a request failed; the engine goes on", exc_info=error)
        self._bump("failed_requests")
        return RequestFailed(f"the server failed on this request ({type(error).__name__}; see the server log)")

    def _out_of_memory(self) -> None:
        self._bump("out_of_memory")
        self.feature_cache.clear()
        free_memory()

    def _count(self, seq: Sequence) -> None:
        self._bump("completion_tokens", len(seq.tokens))

    def _bump(self, name: str, n: int = 1) -> None:
        self.stats.bump(name, n)

    def _peak(self, rows: int) -> None:
        self.stats.peak(rows)


def _stream(item: Stream | Sequence) -> Stream:
    return item.stream if isinstance(item, Sequence) else item


def _unfinished(item: Stream | Sequence, reason: str, error: BaseException | None = None) -> Completion:
    """The completion of a request that ends before it runs (again): a sequence keeps its text so far."""
    return item.completion(reason, error) if isinstance(item, Sequence) else Completion("", reason, error=error)


def _failed(error: BaseException | None) -> BaseException | None:
    return None if error is None else EngineFailed(f"the inference engine stopped after an error: {error}")


__all__ = ["EngineBusy", "EngineFailed", "InferenceEngine", "ModelNotFound", "OutOfMemory", "RequestFailed",
           "context_length", "is_device_fault", "stop_token_ids"]
