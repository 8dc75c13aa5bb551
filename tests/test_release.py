"""Released means freed: a model is gone as soon as its last owner is deleted, with no garbage
collector run (no reference cycle through engine callbacks), so a server that unloads a model or a
benchmark that moves to the next one gets the memory back at once."""

from __future__ import annotations

import contextlib
import gc
import weakref

import peft  # noqa: F401 - imported here, not first inside a test: its import leaves cyclic garbage
import pytest
import tiny

from vlm import load_pretrained
from vlm.engine import GenerationSettings, InferenceEngine, Request
from vlm.errors import VLMError

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SHORT = GenerationSettings(max_new_tokens=2)


@contextlib.contextmanager
def no_collector():
    """Nothing in the block is freed by the cycle collector: what dies there died by refcount."""
    gc.collect()  # earlier tests' garbage must not run a collection in the middle of ours
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def test_engine_frees_its_model_on_del(blip2_opt_dir):
    model, processor = load_pretrained(str(blip2_opt_dir), device="cpu")
    with no_collector():
        engine = InferenceEngine(model, processor, max_batch_size=2)
        engine.generate([Request("a photo of", [tiny.random_image(0)], SHORT)])
        engine.submit(Request("a photo of", [tiny.random_image(1)], SHORT)).result()
        engine.close()  # the scheduler thread holds the engine until it ends
        ref = weakref.ref(model)
        del model, processor, engine
        assert ref() is None


def test_caption_run_frees_its_model(tmp_path, blip2_opt_dir, monkeypatch):
    from vlm import loading
    from vlm.serve import caption

    refs = []

    def load_and_watch(*args, **kwargs):
        model, processor = load_pretrained(*args, **kwargs)
        refs.append(weakref.ref(model))
        return model, processor

    monkeypatch.setattr(loading, "load_pretrained", load_and_watch)  # what `vlm caption` calls
    for i in range(3):
        tiny.random_image(i).save(tmp_path / f"{i}.png")
    with no_collector():
        code = caption.main([str(tmp_path), "--out", str(tmp_path / "out.jsonl"), "--model", str(blip2_opt_dir),
                             "--max-new-tokens", "2", "--num-workers", "0", "--no-progress"])
        assert code == 0 and len(refs) == 1
        assert refs[0]() is None


def serve_one_request(app) -> None:
    """One API request and one metrics scrape, so the app's routes have run."""
    from fastapi.testclient import TestClient

    with TestClient(app) as client:
        reply = client.post("/v1/chat/completions", json={
            "model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "hello"}]})
        assert reply.status_code == 200, reply.text
        assert client.get("/metrics").status_code == 200


def test_closed_engine_lets_go_of_the_model_in_the_api_app(blip2_opt_dir):
    from vlm.serve.api import ApiSettings, make_app

    model, processor = load_pretrained(str(blip2_opt_dir), device="cpu")
    with no_collector():
        engine = InferenceEngine(model, processor, max_batch_size=2)
        app = make_app(engine, ApiSettings("tiny"))
        serve_one_request(app)
        engine.close()  # what `vlm serve` does when uvicorn returns
        ref = weakref.ref(model)
        # FastAPI keeps route functions in a process-wide cache: the app and engine outlive this
        # `del` whatever we do; the model must not.
        del model, processor, engine, app
        assert ref() is None


def test_closed_engine_lets_go_of_the_model_in_the_chat_page(blip2_opt_dir, tmp_path):
    from vlm.serve.app import ChatSettings, build_app, make_respond
    from vlm.serve.frontend import ChatFrontend

    model, processor = load_pretrained(str(blip2_opt_dir), device="cpu")
    with no_collector():
        engine = InferenceEngine(model, processor, max_batch_size=2)
        frontend = ChatFrontend(engine, upload_dirs=[str(tmp_path)])
        demo = build_app(frontend, ChatSettings("tiny", "cpu", "float32", "none", examples=False))
        replies = list(make_respond(frontend)({"text": "hello", "files": []}, [], "", 0.0, 0.9, 2))
        assert replies
        engine.close()  # what `vlm chat` does when the server returns
        ref = weakref.ref(model)
        # Gradio's Blocks hold their components and callbacks in reference cycles: the page, the
        # frontend and the engine wait for the collector; the model must not.
        del model, processor, engine, frontend, demo
        assert ref() is None


def test_closed_engine_refuses_work(blip2_opt_dir):
    model, processor = load_pretrained(str(blip2_opt_dir), device="cpu")
    engine = InferenceEngine(model, processor)
    engine.close()
    with pytest.raises(VLMError, match="closed"):
        engine.generate([Request("a photo of", [tiny.random_image(0)], SHORT)])
    with pytest.raises(VLMError, match="closed"):
        engine.submit(Request("a photo of", [tiny.random_image(0)], SHORT))
