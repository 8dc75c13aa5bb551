"""One request contract: what training computed for a conversation is what every front door feeds.

For an LLM without a chat template (an official-format BLIP-2 OPT) and one with a template, the
token ids the engine reads for a conversation equal, up to the generation prompt, the ids training
computed for it, through the API's, the chat page's and `vlm caption --question`'s code paths.
And a LoRA fine-tuned on conversation rows of a template-less checkpoint is served exactly as it
was trained: a real `vlm serve` asked through the `openai` client, and a real `vlm chat` through
`gradio_client`, give its trained answers.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import openai
import pytest
from gradio_client import Client, handle_file
from PIL import Image, ImageDraw
from server_process import ServerProcess

from vlm import load_pretrained
from vlm.cli import main as vlm_main
from vlm.data import Example
from vlm.engine import InferenceEngine
from vlm.serve.api import ApiSettings, build_request
from vlm.serve.conversation import Turn
from vlm.serve.frontend import ChatFrontend
from vlm.serve.inputs import Item
from vlm.serve.openai_schema import parse_request
from vlm.serve.pipeline import BatchBuilder
from vlm.train.collate import encode_example

COLOURS = ["red", "blue", "green", "yellow"]
SHAPES = ["circle", "square", "circle", "square"]


def shape_picture(i: int) -> Image.Image:
    image = Image.new("RGB", (64, 64), "white")
    draw = ImageDraw.Draw(image)
    (draw.ellipse if SHAPES[i] == "circle" else draw.rectangle)((12, 12, 52, 52), fill=COLOURS[i])
    return image


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


CONVERSATION = [
    {"role": "user", "content": "<image>\nwhat is in the picture?"},
    {"role": "assistant", "content": "a red circle"},
    {"role": "user", "content": "and its colour?"},
    {"role": "assistant", "content": "red"},
]


def api_body(image: Path) -> dict:
    """The conversation up to its last user turn, as an OpenAI client sends it."""
    return {"model": "m", "max_tokens": 3, "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image)}},
                                     {"type": "text", "text": "what is in the picture?"}]},
        {"role": "assistant", "content": "a red circle"},
        {"role": "user", "content": "and its colour?"}]}


@pytest.fixture(params=["blip2_opt_dir", "tiny_vlm_dir"], ids=["no-template", "chat-template"])
def engine(request):
    model, processor = load_pretrained(str(request.getfixturevalue(request.param)), device="cpu")
    engine = InferenceEngine(model, processor)
    yield engine
    engine.close()


def test_every_door_feeds_the_ids_training_computed(engine, tmp_path):
    processor = engine.processor
    image_path = tmp_path / "red.png"
    shape_picture(0).save(image_path)
    trained = encode_example(Example("chat", str(image_path), conversation=CONVERSATION), processor,
                             [Image.open(image_path).convert("RGB")], max_length=512)["input_ids"]

    # The API: an OpenAI body through the server's own request building.
    request = build_request(engine, parse_request(api_body(image_path)), ApiSettings("m"))
    api_ids = engine.encoder.encode(request).input_ids
    assert api_ids == trained[:len(api_ids)] and len(api_ids) < len(trained)

    # The chat page: its turns (uploads in a folder it may read) through `ChatFrontend.prepare`.
    frontend = ChatFrontend(engine, upload_dirs=[str(tmp_path)])
    turns = [Turn(images=[str(image_path)], parts=[{"type": "image"}, {"type": "text", "text": "what is in the "
                                                                                            "picture?"}],
                  reply="a red circle"),
             Turn(parts=[{"type": "text", "text": "and its colour?"}])]
    chat_ids = engine.encoder.encode(frontend.prepare(turns).request).input_ids
    assert chat_ids == api_ids

    # `vlm caption --question`: one question about one image, as training's first turn reads it.
    builder = BatchBuilder(processor, question="what is in the picture?")
    batch = builder[[Item(str(image_path), str(image_path))]]
    caption_ids = engine.encoder.encode(batch.requests[0]).input_ids
    first_turn = encode_example(Example("chat", str(image_path), conversation=CONVERSATION[:2]), processor,
                                [Image.open(image_path).convert("RGB")], max_length=512)["input_ids"]
    assert caption_ids == first_turn[:len(caption_ids)] and len(caption_ids) < len(first_turn)


def write_conversation_rows(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(4):
        shape_picture(i).save(folder / f"{i}.png")
        rows.append({"image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nwhat is in the picture?"},
            {"from": "gpt", "value": f"a {COLOURS[i]} {SHAPES[i]}"}]})
    (folder / "rows.json").write_text(json.dumps(rows))
    return folder / "rows.json"


@pytest.fixture(scope="module")
def finetune(blip2_opt_dir, tmp_path_factory) -> tuple[Path, Path]:
    """A LoRA (and bridge) trained on four conversation rows of a template-less BLIP-2 OPT."""
    data = write_conversation_rows(tmp_path_factory.mktemp("conversation-rows"))
    out = tmp_path_factory.mktemp("conversation-lora")
    assert vlm_main(["train", "--recipe", "lora", "--model", str(blip2_opt_dir), "--train-data", str(data),
                     "--output-dir", str(out), "--max-steps", "150", "--batch-size", "4", "--learning-rate", "1e-2",
                     "lora.r=8", "lora.alpha=16", "lora.dropout=0.0", "warmup=0", "lr_scheduler=constant",
                     "report_to=none", "data.num_workers=0", "save_steps=1000", "logging_steps=1000"]) == 0
    return out, data.parent


def test_a_conversation_finetune_is_served_as_it_was_trained(finetune, tmp_path):
    out, pictures = finetune
    wanted = [f"a {COLOURS[i]} {SHAPES[i]}" for i in range(4)]
    server = ServerProcess("serve", out, tmp_path / "serve.log", "--served-model-name", "m", ready="v1/models")
    try:
        client = openai.OpenAI(base_url=server.url + "v1", api_key="none", max_retries=0, timeout=120)
        answers = []
        for i in range(4):
            content = [{"type": "image_url", "image_url": {"url": data_url(pictures / f"{i}.png")}},
                       {"type": "text", "text": "what is in the picture?"}]
            reply = client.chat.completions.create(model="m", temperature=0, max_tokens=8,
                                                   messages=[{"role": "user", "content": content}])
            answers.append(reply.choices[0].message.content.strip())
        assert answers == wanted
    finally:
        server.stop()
    chat = ServerProcess("chat", out, tmp_path / "chat.log", "--no-examples", ready="gradio_api/info")
    try:
        answers = []
        for i in range(4):
            client = Client(chat.url, verbose=False)
            message = {"text": "what is in the picture?", "files": [handle_file(str(pictures / f"{i}.png"))]}
            answers.append(client.predict(message=message, max_new_tokens=8, temperature=0, api_name="/chat").strip())
        assert answers == wanted
    finally:
        chat.stop()


def test_one_context_rule_drops_oldest_turns_or_refuses():
    from vlm.context import answer_reserve, fit_context
    from vlm.errors import VLMError

    turns = [40, 30, 20]  # tokens each turn adds to the prompt

    def count(kept):
        return sum(kept)

    assert answer_reserve(100, None) == 1 and answer_reserve(100, 30) == 30 and answer_reserve(100, 500) == 50
    fitted = fit_context(turns, count, 100, None, drop_oldest=False)  # no answer length asked: all that is left
    assert (fitted.dropped, fitted.prompt_tokens, fitted.max_new_tokens) == (0, 90, 10)
    fitted = fit_context(turns, count, 100, 30, drop_oldest=True)  # the chat page: the oldest turn goes
    assert (fitted.turns, fitted.dropped, fitted.max_new_tokens) == ([30, 20], 1, 30)
    with pytest.raises(VLMError, match="needs 90 tokens .* and its answer 30, but this model reads at most 100"):
        fit_context(turns, count, 100, 30, drop_oldest=False)  # the API: refused, as OpenAI refuses
    with pytest.raises(VLMError, match="needs 120 tokens"):
        fit_context([120], count, 100, None, drop_oldest=True)  # the last turn is never dropped
