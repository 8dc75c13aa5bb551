"""Monitoring a real `vlm serve`: Prometheus metrics read by prometheus_client's own parser, and the
`/health` and `/ready` probes while serving, with a full queue and through a shutdown."""

from __future__ import annotations

import base64
import io
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from scrape import scrape, total
from server_process import ServerProcess
from tiny import random_image

from vlm import load_pretrained
from vlm.engine import InferenceEngine

KEY = "monitor-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
HISTOGRAMS = ("vlm_request_queue_time_seconds", "vlm_time_to_first_token_seconds", "vlm_e2e_request_latency_seconds",
              "vlm_request_prompt_tokens", "vlm_request_completion_tokens", "vlm_request_batch_size")


def data_url(seed: int) -> str:
    buffer = io.BytesIO()
    random_image(seed).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def ask(text: str, image: str | None = None) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": image}}] if image else []
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def lora_dir(blip2_opt_dir, tmp_path_factory) -> Path:
    """A LoRA adapter folder on the tiny BLIP-2 (untrained: only its name matters here). Requests with
    images run it (`adapter="default"`), text-only ones the base LLM (`adapter="base"`)."""
    from peft import LoraConfig, get_peft_model

    model, _ = load_pretrained(str(blip2_opt_dir), device="cpu")
    model = get_peft_model(model, LoraConfig(r=2, target_modules=r"language_model\..*\.(?:q_proj|v_proj)"))
    model.peft_config["default"].base_model_name_or_path = str(blip2_opt_dir)
    out = tmp_path_factory.mktemp("lora")
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def server(lora_dir, tmp_path_factory):
    """One reply at a time and one waiting: a third request in flight is refused (503)."""
    srv = ServerProcess("serve", lora_dir, tmp_path_factory.mktemp("monitor") / "serve.log",
                        "--max-batch-size", "1", "--max-queue", "1", "--served-model-name", "tiny",
                        "--api-key", KEY, ready="ready")  # the probe needs no key
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "v1", api_key=KEY, max_retries=0, timeout=60)


def test_metrics_count_every_request_by_status_adapter_and_stage(server, client):
    before = scrape(server.url + "metrics", AUTH)
    image = data_url(1)
    replies = [client.chat.completions.create(model="tiny", messages=ask("what is it?", image), max_tokens=8),
               client.chat.completions.create(model="tiny", messages=ask("and now?", image), max_tokens=8)]
    chunks = list(client.chat.completions.create(model="tiny", messages=ask("colour?", data_url(2)), max_tokens=8,
                                                 stream=True, stream_options={"include_usage": True}))
    text_only = client.chat.completions.create(model="tiny", messages=ask("hello there"), max_tokens=8)
    tokens = {"default": sum(r.usage.completion_tokens for r in replies) + chunks[-1].usage.completion_tokens,
              "base": text_only.usage.completion_tokens}
    bad = [ask("broken", "data:image/png;base64,!!!"), [{"role": "assistant", "content": "no question"}]]
    for messages in bad:
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="tiny", messages=messages, max_tokens=8)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=ask("hi"), max_tokens=8)
    assert httpx.post(server.url + "v1/chat/completions", json={}).status_code == 401
    assert httpx.get(server.url + "metrics").status_code == 401  # behind the key, as /v1

    after = scrape(server.url + "metrics", AUTH)
    kinds = {f.name: f.type for f in after}
    assert kinds["vlm_requests"] == kinds["vlm_http_requests"] == "counter"
    assert all(kinds[name] == "histogram" for name in HISTOGRAMS)

    def grew(sample: str, **labels: str) -> float:
        return total(after, sample, **labels) - total(before, sample, **labels)

    endpoint = "/v1/chat/completions"
    assert {status: grew("vlm_http_requests_total", endpoint=endpoint, status=status)
            for status in ("200", "400", "401", "404")} == {"200": 4, "400": 2, "401": 1, "404": 1}
    for adapter, count in (("default", 3), ("base", 1)):  # the bad requests never reached the engine
        labels = {"adapter": adapter, "front_door": "api"}
        assert grew("vlm_requests_total", **labels) == count, adapter
        for name in HISTOGRAMS:
            assert grew(f"{name}_count", **labels) == count, (name, adapter)
            assert grew(f"{name}_bucket", le="+Inf", **labels) == count, (name, adapter)
        assert grew("vlm_request_completion_tokens_sum", **labels) == tokens[adapter]
        assert grew("vlm_request_batch_size_sum", **labels) == count  # --max-batch-size 1
    latency, first_token = grew("vlm_e2e_request_latency_seconds_sum"), grew("vlm_time_to_first_token_seconds_sum")
    assert 0 < grew("vlm_request_queue_time_seconds_sum") <= first_token <= latency
    assert grew("vlm_feature_cache_hits_total") >= 1  # the second question about the first picture
    assert grew("vlm_vision_encodes_total") == 2  # two distinct pictures
    assert total(after, "vlm_running_requests") == total(after, "vlm_waiting_requests") == 0


def test_ready_is_503_while_the_queue_is_full_and_recovers(server, client):
    stop = threading.Event()
    refused, unexpected = [], []

    def keep_busy() -> None:  # three clients for one running place and one waiting place
        while not stop.is_set():
            try:
                client.chat.completions.create(model="tiny", messages=ask("tell me more"), max_tokens=60,
                                               temperature=1.0)
            except openai.APIStatusError as e:
                (refused if e.status_code == 503 else unexpected).append(e)
                time.sleep(0.01)

    before = scrape(server.url + "metrics", AUTH)
    workers = [threading.Thread(target=keep_busy) for _ in range(3)]
    for worker in workers:
        worker.start()
    answers = []
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any(r.status_code == 503 for r in answers):
            answers.append(httpx.get(server.url + "ready", timeout=10))
            assert httpx.get(server.url + "health", timeout=10).status_code == 200
    finally:
        stop.set()
        for worker in workers:
            worker.join(timeout=60)
    assert not unexpected, unexpected
    full = [r for r in answers if r.status_code == 503]
    assert full, f"/ready never saw the queue full: {[r.status_code for r in answers]}"
    assert full[0].json() == {"status": "unavailable", "reason": "the request queue is full"}
    assert wait_for(lambda: httpx.get(server.url + "ready", timeout=10).status_code == 200, 30)
    after = scrape(server.url + "metrics", AUTH)
    busy = total(after, "vlm_http_requests_total", status="503") - total(before, "vlm_http_requests_total", status="503")
    assert busy == len(refused) > 0


def test_ready_is_503_once_the_engine_is_closed(blip2_opt_dir):
    from fastapi.testclient import TestClient

    from vlm.serve.api import ApiSettings, make_app

    model, processor = load_pretrained(str(blip2_opt_dir), device="cpu")
    engine = InferenceEngine(model, processor, max_batch_size=1)
    with TestClient(make_app(engine, ApiSettings("tiny"), with_api=False)) as http:  # vlm chat, open host, no key
        assert http.get("/ready").json() == {"status": "ready"} and http.get("/metrics").status_code == 404
    with TestClient(make_app(engine, ApiSettings("tiny", api_key=KEY))) as http:
        assert http.get("/ready").json() == {"status": "ready"}
        engine.close()
        assert http.get("/health").status_code == 200
        reply = http.get("/ready")
        assert reply.status_code == 503 and reply.json()["reason"] == "the model is not loaded"


def test_chat_page_requests_count_under_their_front_door(blip2_opt_dir):
    from fastapi.testclient import TestClient

    from vlm.serve.api import ApiSettings, make_app
    from vlm.serve.conversation import new_turn
    from vlm.serve.frontend import ChatFrontend

    model, processor = load_pretrained(str(blip2_opt_dir), device="cpu")
    engine = InferenceEngine(model, processor, max_batch_size=2)
    app = make_app(engine, ApiSettings("tiny"))  # as `vlm chat` builds it, before mounting the page
    with TestClient(app) as http:
        ChatFrontend(engine, upload_dirs=[]).reply([new_turn("hello", [])], max_new_tokens=3)
        assert http.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 3,
                                                       "messages": ask("hello")}).status_code == 200
        families = scrape_app(http)
    engine.close()
    for door in ("chat", "api"):
        assert total(families, "vlm_requests_total", front_door=door, adapter="base") == 1, door
        assert total(families, "vlm_e2e_request_latency_seconds_count", front_door=door) == 1, door
    assert total(families, "vlm_http_requests_total") == 1  # the page's own traffic is not the API's


def scrape_app(http) -> list:
    from prometheus_client.parser import text_string_to_metric_families

    return list(text_string_to_metric_families(http.get("/metrics").text))


def test_probes_through_a_shutdown(blip2_opt_dir, tmp_path):
    srv = ServerProcess("serve", blip2_opt_dir, tmp_path / "serve.log", ready="ready")
    probes: list[tuple[str, int | str]] = []
    done = threading.Event()

    def probe() -> None:
        with httpx.Client(timeout=5) as http:  # one kept-alive connection, as a load balancer's
            while not done.is_set():
                for path in ("health", "ready"):
                    try:
                        probes.append((path, http.get(srv.url + path).status_code))
                    except httpx.TransportError as e:
                        probes.append((path, type(e).__name__))
                time.sleep(0.02)

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        assert wait_for(lambda: len(probes) >= 10, 30)
        srv.proc.terminate()  # SIGTERM, as a supervisor stops it
        code = srv.proc.wait(timeout=30)
        wait_for(lambda: isinstance(probes[-1][1], str), 5)
    finally:
        done.set()
        prober.join(timeout=30)
        srv.stop()
    assert code == 0, srv.log()[-3000:]
    down = next(i for i, (_, answer) in enumerate(probes) if answer != 200)
    assert down >= 10 and all(answer == 200 for _, answer in probes[:down])
    # From the first probe that failed on: /ready is never 200 again, /health answers nothing but
    # 200 (it is up while the process serves) or a closed connection.
    after = probes[down:]
    assert not any(path == "ready" and answer == 200 for path, answer in after), probes[down - 2:]
    assert all(answer in (200, 503) or isinstance(answer, str) for _, answer in after)
    assert all(answer == 200 or isinstance(answer, str) for path, answer in after if path == "health")


def wait_for(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False
