"""`POST /v1/embeddings`: vectors a search index can use reproduce `vlm score`'s ITC exactly."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from server_process import ServerProcess

import tiny
from vlm.cli import main as vlm_main

TEXTS = ["a red circle", "a photo of a dog on a sofa", "blue square", "two people talking"]


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def image_vectors(server: ServerProcess, paths: list[Path], model: str = "m") -> list[np.ndarray]:
    """Each image's (queries, dim) vectors, asked as vLLM's multimodal embedding requests ask."""
    content = [{"type": "image_url", "image_url": {"url": data_url(p)}} for p in paths]
    reply = httpx.post(server.url + "v1/embeddings", timeout=120, json={
        "model": model, "messages": [{"role": "user", "content": content}], "encoding_format": "float"})
    assert reply.status_code == 200, reply.text
    rows = reply.json()["data"]
    assert [r["kind"] for r in rows] == ["image"] * len(paths)
    return [np.asarray(r["embedding"], dtype=np.float32).reshape(r["queries"], -1) for r in rows]


def itc_of_score(model_dir: Path, paths: list[Path], tmp_path: Path) -> dict[tuple[str, str], float]:
    """`vlm score`'s ITC for every (image, text) pair."""
    out = tmp_path / "scores.jsonl"
    args = ["score", *map(str, paths), "--out", str(out), "--model", str(model_dir), "--num-workers", "0", "--no-progress"]
    for text in TEXTS:
        args += ["--text", text]
    assert vlm_main(args) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    return {(Path(r["image"]).name, r["text"]): r["itc"] for r in rows}


@pytest.fixture(scope="module")
def retrieval(tmp_path_factory):
    """An official-format Blip2ForImageTextRetrieval (no LLM) served for embeddings alone, and images."""
    root = tmp_path_factory.mktemp("embeddings")
    model_dir = tiny.save_official_retrieval(root / "retrieval", width=32)
    pictures = []
    for seed in range(3):
        pictures.append(root / f"picture{seed}.png")
        tiny.random_image(seed, (48, 40)).save(pictures[-1])
    server = ServerProcess("serve", model_dir, root / "serve.log", "--served-model-name", "m", ready="v1/models")
    yield server, model_dir, pictures
    server.stop()


def test_vectors_reproduce_vlm_score_itc(retrieval, tmp_path):
    server, model_dir, pictures = retrieval
    client = openai.OpenAI(base_url=server.url + "v1", api_key="none", max_retries=0)
    reply = client.embeddings.create(model="m", input=TEXTS)  # the client asks for base64 and decodes it
    texts = np.asarray([d.embedding for d in reply.data], dtype=np.float32)
    assert texts.shape[0] == len(TEXTS) and reply.usage.prompt_tokens > len(TEXTS)
    assert np.allclose(np.linalg.norm(texts, axis=1), 1, atol=1e-5)
    images = image_vectors(server, pictures)
    wanted = itc_of_score(model_dir, pictures, tmp_path)
    for path, vectors in zip(pictures, images):
        assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
        for text, vector in zip(TEXTS, texts):
            itc = float((vectors @ vector).max())  # the best of the image's query vectors
            assert abs(itc - wanted[(path.name, text)]) < 1e-5, (path.name, text)
    one = client.embeddings.create(model="m", input=TEXTS[1], encoding_format="float").data[0].embedding
    assert np.allclose(one, texts[1], atol=1e-6)  # a text alone: the same vector as in a batch


@pytest.mark.parametrize("body, status, words", [
    ({"model": "m", "input": ""}, 400, "non-empty"),
    ({"model": "m", "input": []}, 400, "non-empty"),
    ({"model": "m"}, 400, "one of the two"),
    ({"model": "m", "input": "a", "messages": []}, 400, "one of the two"),
    ({"model": "m", "input": [1, 2]}, 400, "input"),
    ({"model": "m", "input": "a", "dimensions": 8}, 400, "dimensions"),
    ({"model": "m", "input": "a", "encoding_format": "int8"}, 400, "encoding_format"),
    ({"model": "m", "messages": [{"role": "user", "content": "just text"}]}, 400, "no image_url"),
    ({"model": "m", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@"}}]}]}, 400, "base64"),
    ({"model": "other", "input": "a"}, 404, "does not exist"),
])
def test_bad_embedding_requests(retrieval, body, status, words):
    server, _, _ = retrieval
    reply = httpx.post(server.url + "v1/embeddings", json=body, timeout=60)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and words in error["message"], error


def test_a_retrieval_model_answers_no_chat_and_a_chat_model_no_embeddings(retrieval, blip2_opt_dir, tmp_path):
    server, _, _ = retrieval
    reply = httpx.post(server.url + "v1/chat/completions", timeout=60,
                       json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert reply.status_code == 400 and "no language model" in reply.json()["error"]["message"]
    chat = ServerProcess("serve", blip2_opt_dir, tmp_path / "serve.log", "--served-model-name", "m", ready="v1/models")
    try:
        reply = httpx.post(chat.url + "v1/embeddings", json={"model": "m", "input": "a"}, timeout=60)
        assert reply.status_code == 400 and "no image-text (ITC) heads" in reply.json()["error"]["message"]
    finally:
        chat.stop()
