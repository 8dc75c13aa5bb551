"""Several fine-tunes on one base in one `vlm serve`: chosen per request, decoded together, loaded and
unloaded while serving, one copy of the base in memory."""

from __future__ import annotations

import base64
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from PIL import Image, ImageDraw
from server_process import ServerProcess

from vlm import load_pretrained
from vlm.cli import main as vlm_main
from vlm.engine import GenerationSettings, InferenceEngine, Request

KEY = "adapters-key"
QUESTION = "what is in the picture?"
COLOURS = ["red", "blue", "green", "yellow"]


def picture(i: int) -> Image.Image:
    image = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(image).ellipse((12, 12, 52, 52), fill=COLOURS[i])
    return image


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def train_adapter(base: Path, folder: Path, answers: list[str]) -> Path:
    """A LoRA + bridge trained briefly on conversation rows answering `answers` for the pictures."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"image": f"../pictures/{i}.png", "conversations": [{"from": "human", "value": f"<image>\n{QUESTION}"},
                                                                 {"from": "gpt", "value": answer}]}
            for i, answer in enumerate(answers)]
    (folder / "rows.json").write_text(json.dumps(rows))
    out = folder / "out"
    assert vlm_main(["train", "--recipe", "lora", "--model", str(base), "--train-data", str(folder / "rows.json"),
                     "--output-dir", str(out), "--max-steps", "40", "--batch-size", "4", "--learning-rate", "1e-2",
                     "lora.r=8", "lora.alpha=16", "lora.dropout=0.0", "warmup=0", "lr_scheduler=constant",
                     "report_to=none", "data.num_workers=0", "save_steps=1000", "logging_steps=1000"]) == 0
    return out


@pytest.fixture(scope="module")
def setup(blip2_opt_dir, tmp_path_factory):
    """The base, two fine-tunes trained on different answers for the same pictures, the pictures."""
    root = tmp_path_factory.mktemp("adapters")
    (root / "pictures").mkdir()
    pictures = []
    for i in range(4):
        pictures.append(root / "pictures" / f"{i}.png")
        picture(i).save(pictures[-1])
    colours = train_adapter(blip2_opt_dir, root / "colours", [f"a {c} circle" for c in COLOURS])
    numbers = train_adapter(blip2_opt_dir, root / "numbers", ["number one", "number two", "number three", "number four"])
    return {"base": blip2_opt_dir, "colours": colours, "numbers": numbers, "pictures": pictures}


def alone(model_dir: Path, pictures: list[Path]) -> list[str]:
    """Each picture's greedy answer from the model served alone (its own engine, nothing else loaded)."""
    model, processor = load_pretrained(str(model_dir), device="cpu")
    engine = InferenceEngine(model, processor)
    prompt = processor.format_question(QUESTION)
    out = [c.text for c in engine.generate([Request(prompt, [Image.open(p).convert("RGB")],
                                                    GenerationSettings(max_new_tokens=6)) for p in pictures])]
    engine.close()
    return out


def ask(client: openai.OpenAI, model: str, image: Path, max_tokens: int = 6) -> str:
    content = [{"type": "image_url", "image_url": {"url": data_url(image)}}, {"type": "text", "text": QUESTION}]
    reply = client.chat.completions.create(model=model, temperature=0, max_tokens=max_tokens,
                                           messages=[{"role": "user", "content": content}])
    return reply.choices[0].message.content


def test_fine_tunes_share_one_base_and_one_batch(setup, tmp_path):
    wanted = {name: alone(setup[name], setup["pictures"]) for name in ("base", "colours", "numbers")}
    assert len({tuple(v) for v in wanted.values()}) == 3  # three models that answer differently
    server = ServerProcess("serve", setup["base"], tmp_path / "serve.log", "--served-model-name", "base",
                           "--adapter", f"colours={setup['colours']}", "--adapter", f"numbers={setup['numbers']}",
                           "--api-key", KEY, ready="v1/models", headers={"Authorization": f"Bearer {KEY}"})
    try:
        client = openai.OpenAI(base_url=server.url + "v1", api_key=KEY, max_retries=0, timeout=120)
        assert [m.id for m in client.models.list().data] == ["base", "colours", "numbers"]
        jobs = [(name, i) for i in range(4) for name in ("base", "colours", "numbers")]  # 12, interleaved
        with ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(lambda job: ask(client, job[0], setup["pictures"][job[1]]), jobs))
        assert answers == [wanted[name][i] for name, i in jobs]
        with pytest.raises(openai.NotFoundError, match="'other' does not exist"):
            ask(client, "other", setup["pictures"][0])

        # Load one more while requests run; unload one whose requests are still running.
        running = []
        threads = [threading.Thread(target=lambda i=i: running.append(ask(client, "colours", setup["pictures"][i], 40)))
                   for i in range(4)]
        for thread in threads:
            thread.start()
        post = {"headers": {"Authorization": f"Bearer {KEY}"}, "timeout": 120}
        loaded = httpx.post(server.url + "v1/load_lora_adapter",
                            json={"lora_name": "again", "lora_path": str(setup["numbers"])}, **post)
        assert loaded.status_code == 200, loaded.text
        assert [ask(client, "again", p) for p in setup["pictures"]] == wanted["numbers"]
        gone = httpx.post(server.url + "v1/unload_lora_adapter", json={"lora_name": "colours"}, **post)
        assert gone.status_code == 200, gone.text
        for thread in threads:
            thread.join()
        assert len(running) == 4 and all(isinstance(text, str) for text in running)  # none dropped
        with pytest.raises(openai.NotFoundError):
            ask(client, "colours", setup["pictures"][0])
        assert [m.id for m in client.models.list().data] == ["base", "numbers", "again"]
        assert httpx.post(server.url + "v1/unload_lora_adapter", json={"lora_name": "colours"},
                          **post).status_code == 404
        assert httpx.post(server.url + "v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(tmp_path)},
                          **post).status_code == 400  # not a LoRA output
    finally:
        server.stop()


def test_three_fine_tunes_hold_one_base(setup, tmp_path):
    """Resident memory with three fine-tunes loaded is below 1.3x that with one: each adds its LoRA
    and bridge, not another copy of the model."""
    server = ServerProcess("serve", setup["base"], tmp_path / "serve.log", "--served-model-name", "base",
                           "--adapter", f"colours={setup['colours']}", "--api-key", KEY, ready="v1/models",
                           headers={"Authorization": f"Bearer {KEY}"})
    try:
        client = openai.OpenAI(base_url=server.url + "v1", api_key=KEY, max_retries=0, timeout=120)
        for picture in setup["pictures"]:
            ask(client, "colours", picture)
        one = server.memory_mb()
        post = {"headers": {"Authorization": f"Bearer {KEY}"}, "timeout": 120}
        for name, path in (("numbers", setup["numbers"]), ("again", setup["colours"])):
            httpx.post(server.url + "v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)},
                       **post).raise_for_status()
            for picture in setup["pictures"]:
                ask(client, name, picture)
        assert server.memory_mb() < 1.3 * one, (one, server.memory_mb())
    finally:
        server.stop()


def test_adapter_routes_need_the_api_key(setup, tmp_path):
    server = ServerProcess("serve", setup["base"], tmp_path / "serve.log", ready="v1/models")
    try:
        reply = httpx.post(server.url + "v1/load_lora_adapter",
                           json={"lora_name": "x", "lora_path": str(setup["colours"])}, timeout=60)
        assert reply.status_code == 403 and "--api-key" in reply.json()["error"]["message"]
    finally:
        server.stop()


def test_a_fine_tune_that_does_not_fit_is_refused(setup, tmp_path):
    """A bridge holding weights every fine-tune shares, a bridge of another shape, a LoRA that cannot
    run per row (DoRA, embedding LoRA) or a name already served is a VLMError naming the adapter; the
    fine-tunes already served keep answering."""
    import shutil

    from safetensors.torch import load_file, save_file

    from vlm.errors import VLMError

    model, processor = load_pretrained(str(setup["base"]), device="cpu")
    engine = InferenceEngine(model, processor)
    try:
        engine.add_adapter("colours", str(setup["colours"]))
        bridge = load_file(setup["colours"] / "bridge.safetensors")
        assert bridge and not any(k.startswith(("language_model.", "vision_model.")) for k in bridge)
        llm = next(k for k, v in model.state_dict().items() if k.startswith("language_model.") and v.ndim == 2)
        name = next(iter(bridge))
        hostile = {"shared": {**bridge, llm: model.state_dict()[llm].clone()},
                   "shape": {**bridge, name: bridge[name].new_zeros(bridge[name].shape[0] + 1)},
                   "unknown": {**bridge, "qformer.not_a_module.weight": bridge[name].clone()}}
        messages = {"shared": "--adapter shared: .* trained weights the fine-tunes share",
                    "shape": f"bridge\\.safetensors: {name} has shape", "unknown": "lacks"}
        for what, state in hostile.items():
            folder = tmp_path / what
            shutil.copytree(setup["colours"], folder)
            save_file(state, folder / "bridge.safetensors")
            with pytest.raises(VLMError, match=messages[what]):
                engine.add_adapter(what, str(folder))
        for what, change, message in (
                ("dora", {"use_dora": True}, r"--adapter dora=.*'dora' on .*_proj: .*no DoRA.*served unmerged"),
                ("embedding", {"target_modules": ["embed_tokens", "q_proj"]},
                 r"--adapter embedding=.*'embedding' on .*embed_tokens")):
            folder = tmp_path / what
            shutil.copytree(setup["colours"], folder)
            config = json.loads((folder / "adapter_config.json").read_text())
            (folder / "adapter_config.json").write_text(json.dumps({**config, **change}))
            with pytest.raises(VLMError, match=message):
                engine.add_adapter(what, str(folder))
            assert what not in engine.routing.model.peft_config  # nothing of it stays loaded
        with pytest.raises(VLMError, match="--adapter colours: that name is taken"):
            engine.add_adapter("colours", str(setup["numbers"]))
        assert engine.models() == ["colours"]
        request = Request(processor.format_question(QUESTION), [picture(0)], GenerationSettings(max_new_tokens=6),
                          model="colours")
        assert engine.generate([request])[0].text == alone(setup["colours"], setup["pictures"][:1])[0]
    finally:
        engine.close()
