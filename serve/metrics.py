"""Monitoring of a serving process: Prometheus metrics (`GET /metrics`) and the `/ready` probe's answer.

Each app has a `ServeMetrics` on a `CollectorRegistry` of its own (not prometheus_client's global
one), so two apps in one process do not clash. Three sources feed it:

- the engine, through its finish listener: one observation per request, whichever front door sent
  it (the API or the chat page), labelled by the adapter it ran and the front door;
- the engine's running totals and the feature cache, read at scrape time (`EngineCollector`);
- the API's HTTP answers by status code (`StatusCounter`, an ASGI middleware on `/v1`).
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from vlm.engine import InferenceEngine, Stream
from vlm.engine.adapters import BASE

# Seconds: from a cached image's few milliseconds to a long reply on a busy CPU.
SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)
TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
REQUEST_LABELS = ("adapter", "front_door")
COMPLETED = ("stop", "length")  # finish reasons of a reply that was given in full

__all__ = ["CONTENT_TYPE_LATEST", "ServeMetrics", "StatusCounter", "adapter_label", "front_door", "not_ready"]


def adapter_label(engine: InferenceEngine, stream: Stream) -> str:
    """The `adapter` label of a request: the LoRA adapter it ran, or "base" for the plain LLM."""
    name = engine.routing.name(stream.request)
    return "base" if name in (None, BASE) else name


def front_door(stream: Stream) -> str:
    """The `front_door` label: the request's `origin` ("api", "chat"); "other" for a program's own requests."""
    return stream.request.origin or "other"


def not_ready(engine: InferenceEngine) -> str | None:
    """Why the server cannot take a request now (the `/ready` probe's 503), or None when it can."""
    if engine.failure is not None:
        return "the inference engine stopped after an error"
    if engine.model is None:  # `close()` lets go of the model: the server is shutting down
        return "the model is not loaded"
    if engine.queue_full:
        return "the request queue is full"
    return None


class ServeMetrics:
    """The metrics of one app on one engine; `text()` is the `/metrics` body."""

    def __init__(self, engine: InferenceEngine):
        self.engine = engine
        self.registry = CollectorRegistry()
        self.requests = Counter("vlm_requests", "Requests the engine finished, by how they ended",
                                (*REQUEST_LABELS, "finish_reason"), registry=self.registry)
        self.queue_time = self._histogram("vlm_request_queue_time_seconds",
                                          "Time from submission until the engine took the request from its queue",
                                          SECONDS)
        self.first_token = self._histogram("vlm_time_to_first_token_seconds",
                                           "Time from submission until the first text of the reply", SECONDS)
        self.latency = self._histogram("vlm_e2e_request_latency_seconds",
                                       "Time from submission until the reply was complete", SECONDS)
        self.prompt_tokens = self._histogram("vlm_request_prompt_tokens", "Prompt tokens per request", TOKENS)
        self.completion_tokens = self._histogram("vlm_request_completion_tokens", "Completion tokens per request",
                                                 TOKENS)
        self.batch_size = self._histogram("vlm_request_batch_size",
                                          "Rows decoding together when the request joined the running batch, "
                                          "itself included", ROWS)
        self.http = Counter("vlm_http_requests", "HTTP requests the API answered, by endpoint and status code",
                            ("endpoint", "status"), registry=self.registry)
        self.registry.register(EngineCollector(engine))
        engine.add_finish_listener(self.observe)

    def _histogram(self, name: str, documentation: str, buckets: tuple) -> Histogram:
        return Histogram(name, documentation, REQUEST_LABELS, buckets=buckets, registry=self.registry)

    def observe(self, stream: Stream) -> None:
        """Record a finished request. Runs in the engine's thread, so it only moves counters.

        Every request counts in `vlm_requests_total`; the histograms hold the replies given in
        full, so that a client leaving early or a failed request does not pass for a fast reply."""
        labels = (adapter_label(self.engine, stream), front_door(stream))
        completion = stream.completion
        self.requests.labels(*labels, completion.finish_reason).inc()
        if completion.finish_reason not in COMPLETED:
            return
        start = stream.submitted_at
        if stream.admitted_at is not None:
            self.queue_time.labels(*labels).observe(stream.admitted_at - start)
        if stream.first_token_at is not None:
            self.first_token.labels(*labels).observe(stream.first_token_at - start)
        self.latency.labels(*labels).observe(stream.finished_at - start)
        self.prompt_tokens.labels(*labels).observe(completion.prompt_tokens)
        self.completion_tokens.labels(*labels).observe(completion.completion_tokens)
        if stream.batch_size is not None:  # None: no decoding (the novelty answer)
            self.batch_size.labels(*labels).observe(stream.batch_size)

    def count_http(self, endpoint: str, status: int) -> None:
        """Count one HTTP answer."""
        self.http.labels(endpoint, str(status)).inc()

    def text(self) -> bytes:
        """Every metric in Prometheus' text format."""
        return generate_latest(self.registry)


class EngineCollector(Collector):
    """The engine's running totals and the image feature cache, read when scraped."""

    def __init__(self, engine: InferenceEngine):
        self.engine = engine

    def collect(self):
        """Yield the metric families (prometheus_client calls this on every scrape)."""
        engine, stats = self.engine, self.engine.stats
        cache = engine.feature_cache
        counters = [
            ("vlm_completion_tokens", "Tokens generated, every request (offline batches too)",
             stats["completion_tokens"]),
            ("vlm_decode_steps", "Decode steps of the running batch", stats["decode_steps"]),
            ("vlm_vision_encodes", "Images run through the vision tower", engine.encoder.vision_encodes),
            ("vlm_feature_cache_hits", "Images found in the feature cache (no vision-tower pass)", cache.hits),
            ("vlm_feature_cache_misses", "Images not in the feature cache", cache.misses),
            ("vlm_out_of_memory", "Out-of-memory errors the engine recovered from", stats["out_of_memory"]),
            ("vlm_evicted", "Sequences evicted from the running batch to free memory (resumed later)",
             stats["evicted"]),
            ("vlm_failed_requests", "Requests that failed on an unexpected error", stats["failed_requests"]),
        ]
        for name, documentation, value in counters:
            yield CounterMetricFamily(name, documentation, value=value)
        gauges = [
            ("vlm_running_requests", "Requests in the running batch", engine.running),
            ("vlm_waiting_requests", "Requests waiting for a place in the running batch", engine.waiting),
            ("vlm_peak_batch_size", "Largest running batch so far", stats["peak_batch"]),
            ("vlm_feature_cache_bytes", "Memory held by cached image features", cache.nbytes),
        ]
        for name, documentation, value in gauges:
            yield GaugeMetricFamily(name, documentation, value=value)


class StatusCounter:
    """ASGI middleware: counts each HTTP answer by endpoint (the route's path, so that ids in
    paths do not make new series) and status code."""

    def __init__(self, app, metrics: ServeMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = None
        mount = scope.get("route")  # the router below replaces it with the route it matches

        async def send_counted(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        except Exception:
            status = status or 500  # the app's outermost handler answers a bug with a 500
            raise
        finally:
            if status is not None:
                self.metrics.count_http(_endpoint(scope, mount), status)


def _endpoint(scope, mount) -> str:
    """The matched route's path under its mount (`/v1/models/{name}`), or "unmatched"."""
    route = scope.get("route")  # set by the router on the scope it was given
    path = getattr(route, "path_format", None)
    return scope.get("root_path", "") + path if route is not mount and path else "unmatched"
