"""`vlm serve` as programs meet it: a real server subprocess driven by the official `openai` client."""

from __future__ import annotations

import base64
import contextlib
import functools
import http.server
import io
import json
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from PIL import Image
from scrape import scrape, totals
from server_process import ServerProcess, vlm_command
from tiny import random_image

from vlm import load_pretrained
from vlm.engine import GenerationSettings, InferenceEngine, Request
from vlm.serve.caption import main as caption_main
from vlm.serve.writers import iter_rows

KEY = "test-key-123"


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def metrics(server) -> dict[str, float]:
    return totals(scrape(server.url + "metrics", {"Authorization": f"Bearer {KEY}"}))


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("api-pictures")
    paths = []
    for seed in (1, 2):
        paths.append(folder / f"picture{seed}.png")
        random_image(seed).save(paths[-1])
    return paths


@pytest.fixture(scope="module")
def chat_server(tiny_vlm_dir, tmp_path_factory):
    """A chat-template model; small limits so the 413 and 503 paths can be reached."""
    srv = ServerProcess("serve", tiny_vlm_dir, tmp_path_factory.mktemp("api") / "serve.log",
                        "--max-request-mb", "1", "--max-batch-size", "4", "--max-queue", "2",
                        "--served-model-name", "tiny", "--api-key", KEY, ready="v1/models",
                        headers={"Authorization": f"Bearer {KEY}"})
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(chat_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=chat_server.url + "v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def local_engine(tiny_vlm_dir):
    model, processor = load_pretrained(str(tiny_vlm_dir), device="cpu")
    return InferenceEngine(model, processor)


def direct(engine: InferenceEngine, messages: list[dict], images: list[Path], max_new_tokens: int) -> str:
    """The engine's own greedy output for the same conversation (no HTTP, no API code)."""
    prompt = engine.processor.format_chat(messages)
    request = Request(prompt, [Image.open(p).convert("RGB") for p in images], GenerationSettings(max_new_tokens))
    return engine.generate([request])[0].text


def user(text: str, *images: Path) -> dict:
    return {"role": "user", "content": [*({"type": "image_url", "image_url": {"url": data_url(p)}} for p in images),
                                        {"type": "text", "text": text}]}


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_completion_streamed_and_not_equal_the_engines_output(client, local_engine, pictures):
    messages = [user("what colour is the shape?", pictures[0])]
    want = direct(local_engine, [{"role": "user", "content": [{"type": "image"},
                                                             {"type": "text", "text": "what colour is the shape?"}]}],
                  pictures[:1], 12)
    assert want, "the tiny model should say something here, or the comparison proves nothing"
    reply = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=12)
    assert reply.choices[0].message.content.strip() == want and reply.object == "chat.completion"
    usage = reply.usage
    assert usage.completion_tokens >= 1 and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=12,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reply.choices[0].message.content
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) >= 2  # streamed, not one piece
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reply.choices[0].finish_reason


def test_multi_turn_with_the_image_in_the_first_message(client, chat_server, local_engine, pictures):
    first = client.chat.completions.create(model="tiny", temperature=0, max_tokens=6,
                                           messages=[user("what colour is the shape?", pictures[1])])
    answer = first.choices[0].message.content
    encodes = metrics(chat_server)["vlm_vision_encodes_total"]
    messages = [user("what colour is the shape?", pictures[1]), {"role": "assistant", "content": answer},
                {"role": "user", "content": "describe the image."}]
    second = client.chat.completions.create(model="tiny", temperature=0, max_tokens=10, messages=messages)
    assert metrics(chat_server)["vlm_vision_encodes_total"] == encodes  # the resent image was found by content
    want = direct(local_engine, [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour is the shape?"}]},
        {"role": "assistant", "content": answer},
        {"role": "user", "content": [{"type": "text", "text": "describe the image."}]}], pictures[1:], 10)
    assert second.choices[0].message.content.strip() == want


def test_settings_stop_seed_and_max_completion_tokens(client, pictures):
    messages = [user("describe it", pictures[0])]
    full = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_completion_tokens=12)
    text = full.choices[0].message.content
    assert full.usage.completion_tokens <= 12
    word = text.split()[1] if len(text.split()) > 1 else text[1:3]
    cut = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=12, stop=[word])
    # Cut before the stop string, then stripped (the one text rule).
    assert cut.choices[0].message.content == text[: text.find(word)].strip() and cut.choices[0].finish_reason == "stop"
    sampled = [client.chat.completions.create(model="tiny", messages=messages, temperature=1.0, top_p=0.95, seed=5,
                                              max_tokens=12).choices[0].message.content for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_concurrent_requests_each_equal_alone(client, pictures):
    asks = [[user(f"question {i}: what is it?", pictures[i % 2])] for i in range(6)]
    alone = [client.chat.completions.create(model="tiny", messages=m, temperature=0, max_tokens=8)
             .choices[0].message.content for m in asks]
    with ThreadPoolExecutor(3) as pool:  # at most batch 4 + queue 2 in flight
        together = list(pool.map(lambda m: client.chat.completions.create(
            model="tiny", messages=m, temperature=0, max_tokens=8).choices[0].message.content, asks))
    assert together == alone


@pytest.mark.parametrize("body, status, param, words", [
    (b"{not json", 400, None, "not valid JSON"),
    ({"model": "tiny"}, 400, "messages", "Field required"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n", "n=1"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": 3}, 400, "temperature", ""),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]},
     400, "tools", "not supported"),
    ({"model": "tiny", "messages": [{"role": "bot", "content": "hi"}]}, 400, "messages[0].role", ""),
    ({"model": "tiny", "messages": [{"role": "assistant", "content": "hi"}]}, 400, "messages", "last message"),
    ({"model": "tiny", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"nope").decode()}}]}]},
     400, "messages[0].content[0]", "not an image"),
    ({"model": "tiny", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]}]},
     400, "messages[0].content[0]", "not valid base64"),
    ({"model": "tiny", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/cat.png"}}]}]},
     400, "messages[0].content[0]", "remote image URLs are disabled"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "what is <image>?"}]}, 400, "messages[0]", "<image>"),
    ({"model": "tiny", "messages": [{"role": "system", "content": "be brief"},
                                    {"role": "assistant", "content": "see <image>"}]}, 400, "messages[1]", "<image>"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "fox " * 400}]}, 400, "messages", "at most"),
    ({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}, 404, "model", "does not exist"),
])
def test_bad_requests_get_their_status_and_openai_error_body(chat_server, client, body, status, param, words):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(chat_server.url + "v1/chat/completions", content=raw, timeout=60,
                          headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param and words in error["message"]
    assert client.models.list().data  # still serving


def test_null_means_default_as_openai_clients_send_it(chat_server, pictures):
    body = {"model": "tiny", "messages": [user("what?", pictures[0])], "max_tokens": 3,
            "temperature": None, "top_p": None, "n": None, "stream": None, "stop": None, "seed": None,
            "stream_options": None}
    response = httpx.post(chat_server.url + "v1/chat/completions", json=body, timeout=60,
                          headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_unknown_routes_and_methods_answer_in_openai_shape(chat_server):
    headers = {"Authorization": f"Bearer {KEY}"}
    for method, path, status in (("GET", "v1/nothing", 404), ("GET", "v1/chat/completions", 405)):
        response = httpx.request(method, chat_server.url + path, headers=headers)
        assert response.status_code == status
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and path.split("/")[-1] in error["message"]


def test_streamed_events_share_one_creation_time_and_are_not_cached(chat_server, pictures):
    body = {"model": "tiny", "messages": [user("what?", pictures[0])], "max_tokens": 8, "stream": True}
    with httpx.stream("POST", chat_server.url + "v1/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as response:
        assert response.headers["cache-control"] == "no-cache"
        events = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len(chunks) >= 3 and len({(c["id"], c["created"]) for c in chunks}) == 1


def test_keys_and_body_size(chat_server, client, tmp_path):
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        response = httpx.get(chat_server.url + "v1/models", headers=headers)
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=chat_server.url + "v1", api_key="wrong", max_retries=0).models.list()
    big = tmp_path / "big.png"
    Image.effect_noise((700, 700), 100).convert("RGB").save(big)  # ~1.4 MB of base64: over --max-request-mb 1
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model="tiny", messages=[user("hi", big)], max_tokens=2)
    assert e.value.status_code == 413 and e.value.body["code"] == "request_too_large"
    assert client.models.list().data


def test_full_queue_is_503_and_the_server_recovers(client, pictures):
    def one(i):
        try:
            return client.chat.completions.create(model="tiny", messages=[user(f"q{i}", pictures[0])],
                                                  temperature=0.5, max_tokens=60).choices[0].message.content
        except openai.APIStatusError as e:
            return e

    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(one, range(12)))
    busy = [r for r in results if isinstance(r, openai.APIStatusError)]
    assert busy and all(r.status_code == 503 and r.body["code"] == "server_busy" for r in busy)
    assert any(isinstance(r, str) for r in results)
    assert client.chat.completions.create(model="tiny", messages=[user("still there?")], max_tokens=3).choices


# -- a model without a chat template: the API asks what `vlm caption --question` asks --------------------
@pytest.fixture(scope="module")
def blip2_server(blip2_opt_dir, tmp_path_factory):
    srv = ServerProcess("serve", blip2_opt_dir, tmp_path_factory.mktemp("api-blip2") / "serve.log",
                        "--allow-remote-images", "--allow-private-image-hosts", "--remote-image-timeout", "2",
                        ready="v1/models")
    yield srv
    srv.stop()


def test_plain_blip2_answer_equals_vlm_caption_question(blip2_server, blip2_opt_dir, pictures, tmp_path):
    question = "what colour is the shape?"
    out = tmp_path / "answers.jsonl"
    assert caption_main([str(pictures[0]), "--out", str(out), "--model", str(blip2_opt_dir), "--question", question,
                         "--num-workers", "0", "--no-progress", "--max-new-tokens", "12"]) == 0
    (row,) = iter_rows(str(out))
    client = openai.OpenAI(base_url=blip2_server.url + "v1", api_key="none", max_retries=0)
    name = client.models.list().data[0].id
    reply = client.chat.completions.create(model=name, temperature=0, max_tokens=12,
                                           messages=[user(question, pictures[0])])
    assert row["answer"] and reply.choices[0].message.content.strip() == row["answer"]


def test_remote_images_when_allowed(blip2_server, pictures):
    """--allow-remote-images: an http URL is fetched (here from a local web server) and answered like
    the same image sent inline; a URL that fails is a 400 naming the part."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(pictures[0].parent))
    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    try:
        client = openai.OpenAI(base_url=blip2_server.url + "v1", api_key="none", max_retries=0)
        name = client.models.list().data[0].id
        url = f"http://127.0.0.1:{web.server_port}/{pictures[0].name}"
        remote = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                              {"type": "text", "text": "what is it?"}]}
        inline = user("what is it?", pictures[0])
        answers = [client.chat.completions.create(model=name, temperature=0, max_tokens=8, messages=[m])
                   .choices[0].message.content for m in (remote, inline)]
        assert answers[0] == answers[1]
        remote["content"][0]["image_url"]["url"] = url + ".missing"
        with pytest.raises(openai.BadRequestError, match="cannot fetch the image"):
            client.chat.completions.create(model=name, max_tokens=2, messages=[remote])
    finally:
        web.shutdown()


class DrippingHandler(http.server.BaseHTTPRequestHandler):
    """An image server that sends a byte every 0.2 s: each read is quick, the whole never arrives."""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", "1000")
        self.end_headers()
        with contextlib.suppress(OSError):  # the API gives up and closes the connection
            for _ in range(100):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.2)


def test_remote_image_total_deadline(blip2_server):
    """--remote-image-timeout bounds the whole download, not each read: a dripping server gets a 400
    after about 2 s, and the server keeps serving."""
    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), DrippingHandler)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    try:
        client = openai.OpenAI(base_url=blip2_server.url + "v1", api_key="none", max_retries=0)
        name = client.models.list().data[0].id
        remote = {"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": f"http://127.0.0.1:{web.server_port}/slow.png"}}]}
        started = time.monotonic()
        with pytest.raises(openai.BadRequestError, match=r"messages\[0\].content\[0\].*took over 2 s"):
            client.chat.completions.create(model=name, max_tokens=2, messages=[remote])
        assert time.monotonic() - started < 8
        assert client.models.list().data[0].id == name
    finally:
        web.shutdown()


def test_serve_refuses_an_open_host_without_a_key(tiny_vlm_dir):
    result = subprocess.run([*vlm_command(), "serve", "--model", str(tiny_vlm_dir), "--host", "0.0.0.0"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "error: --host 0.0.0.0 makes the API reachable from other machines: set --api-key KEY")


def test_images_in_a_data_url_decode_like_files(pictures):
    from vlm.serve.api import ApiSettings, open_image
    from vlm.serve.uploads import ImageLimits, RequestImages

    settings = ApiSettings("m")
    decoded = RequestImages(ImageLimits(), lambda image: image)  # the decoded image itself, not pixel values
    open_image(data_url(pictures[0]), "messages[0].content[0]", settings, decoded)
    (image,) = decoded.decode_all()
    assert image.tobytes() == Image.open(pictures[0]).convert("RGB").tobytes()
    buffer = io.BytesIO()
    Image.new("1", (9000, 9000)).save(buffer, "PNG")  # a bomb: few bytes, 81M pixels
    with pytest.raises(Exception, match="pixels is over"):
        open_image("data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode(), "m[0]", settings, decoded)
