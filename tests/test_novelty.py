"""Novelty warnings: training records its images' statistics; chat, API and caption warn on unlike images."""

from __future__ import annotations

import json
import random

import pytest
import torch
from PIL import Image, ImageDraw

import tiny
from vlm import load_pretrained
from vlm.cli import main as vlm_main
from vlm.engine import GenerationSettings, InferenceEngine, Request
from vlm.novelty import WARNING, NoveltyDetector

pytestmark = pytest.mark.usefixtures("one_torch_thread")
COLOURS = ["red", "green", "blue", "orange", "purple", "black"]


def test_detector_flags_far_points_and_few_near_ones(tmp_path):
    torch.manual_seed(0)
    train = torch.randn(600, 16) * torch.linspace(0.5, 2.0, 16)
    detector = NoveltyDetector.fit(train)
    near = torch.randn(2000, 16) * torch.linspace(0.5, 2.0, 16)
    far = near + 6.0
    flagged_near = (detector.distances(near) > detector.threshold).float().mean()
    assert flagged_near < 0.01 and (detector.distances(far) > detector.threshold).all()
    detector.save(tmp_path)
    again = NoveltyDetector.load(tmp_path)
    assert again.threshold == detector.threshold and torch.equal(again.precision, detector.precision)
    assert NoveltyDetector.load(tmp_path / "nothing") is None


def shapes(folder, n: int = 12, seed: int = 0) -> list:
    """White pictures with one coloured disc of random size and place: the training distribution
    (another `seed`: new pictures of the same kind)."""
    folder.mkdir(parents=True, exist_ok=True)
    draw = random.Random(seed)
    paths = []
    for i in range(n):
        image = Image.new("RGB", (30, 30), "white")
        size = draw.randint(8, 16)
        x, y = draw.randint(1, 29 - size), draw.randint(1, 29 - size)
        ImageDraw.Draw(image).ellipse((x, y, x + size, y + size), fill=draw.choice(COLOURS))
        paths.append(folder / f"shape{i}.png")
        image.save(paths[-1])
    return paths


@pytest.fixture(scope="module")
def trained(tiny_vlm_dir, tmp_path_factory):
    """A LoRA run on drawn shapes: its output records the training images' statistics."""
    root = tmp_path_factory.mktemp("novelty")
    paths = shapes(root / "train", 100)
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps({"image": str(p), "text": "a shape"}) + "\n" for p in paths))
    out = root / "run"
    assert vlm_main(["train", "--recipe", "lora", "--model", str(tiny_vlm_dir), "--train-data", str(data),
                     "--output-dir", str(out), "--max-steps", "1", "report_to=none", "data.num_workers=0"]) == 0
    return out


def photo(seed: int):
    """Noise: nothing like a white picture with a shape."""
    return tiny.random_image(seed, (30, 30))


def test_training_records_statistics_and_the_engine_warns(trained, tmp_path):
    assert (trained / "novelty.safetensors").is_file()
    model, processor = load_pretrained(str(trained), device="cpu")
    assert model.novelty is not None and model.novelty.images == 100
    engine = InferenceEngine(model, processor)
    settings = GenerationSettings(max_new_tokens=2)
    like = [Image.open(p).convert("RGB") for p in shapes(tmp_path / "test", 6, seed=1)]  # not trained on
    unlike = [photo(i) for i in range(6)]
    offline = engine.generate([Request("<image> hi", [im], settings) for im in like + unlike])
    assert [c.warning for c in offline] == [None] * 6 + [WARNING] * 6
    online = [engine.submit(Request("<image> hi", [im], settings)).result() for im in (like[0], unlike[0])]
    assert [c.warning for c in online] == [None, WARNING]
    two = engine.generate([Request("<image> <image> hi", [like[1], unlike[1]], settings)])[0]
    assert two.warning == WARNING  # any unlike image warns


def ask_served_about_a_photo(model_dir, tmp_path):
    """A real `vlm serve` of `model_dir` asked, through the `openai` client, about a photo (noise)."""
    import base64
    import io

    import openai
    from server_process import ServerProcess

    server = ServerProcess("serve", model_dir, tmp_path / f"serve-{model_dir.name}.log", ready="v1/models")
    try:
        client = openai.OpenAI(base_url=server.url + "v1", api_key="none", max_retries=0)
        buffer = io.BytesIO()
        photo(0).save(buffer, "PNG")
        image = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
        return client.chat.completions.create(model=client.models.list().data[0].id, max_tokens=3, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                         {"type": "text", "text": "what is it?"}]}])
    finally:
        server.stop()


def test_caption_rows_and_the_api_carry_the_warning(trained, tmp_path):


    folder = tmp_path / "mixed"
    shapes(folder, 2, seed=1)
    photo(0).save(folder / "photo.png")
    out = tmp_path / "captions.jsonl"
    assert vlm_main(["caption", str(folder), "--out", str(out), "--model", str(trained), "--num-workers", "0",
                     "--no-progress", "--max-new-tokens", "2"]) == 0
    rows = {json.loads(line)["image"].rsplit("/", 1)[-1]: json.loads(line) for line in out.read_text().splitlines()}
    assert rows["photo.png"]["warning"] == WARNING and "warning" not in rows["shape0.png"]

    reply = ask_served_about_a_photo(trained, tmp_path)
    assert reply.model_extra["warning"] == WARNING


ONLY_SHAPES = "I only know pictures of shapes; this one is not."


def test_a_model_that_knows_one_kind_of_picture_says_so(trained, tmp_path):
    """With `novelty_answer` set (the demo sets it), an unlike image gets that answer instead of an
    invented one, the same offline, streamed, in caption rows and through the API; like images are
    answered as usual. Without it (`trained`), models answer and warn."""


    from vlm.novelty import NoveltyDetector as Detector

    knows = tmp_path / "knows-shapes"
    knows.mkdir()
    for path in trained.iterdir():  # the same run, its statistics saved with an answer
        if path.is_file():
            (knows / path.name).write_bytes(path.read_bytes())
    detector = Detector.load(trained)
    detector.answer = ONLY_SHAPES
    detector.save(knows)
    model, processor = load_pretrained(str(knows), device="cpu")
    engine = InferenceEngine(model, processor)
    settings = GenerationSettings(max_new_tokens=3)
    like = Image.open(shapes(tmp_path / "test", 1, seed=1)[0]).convert("RGB")
    offline = engine.generate([Request("<image> hi", [im], settings) for im in (like, photo(0))])
    streamed = [engine.submit(Request("<image> hi", [im], settings)).result() for im in (like, photo(0))]
    for like_reply, unlike_reply in (offline, streamed):
        assert like_reply.text != ONLY_SHAPES and like_reply.warning is None
        assert (unlike_reply.text, unlike_reply.warning, unlike_reply.finish_reason) == (ONLY_SHAPES, WARNING, "stop")
    # A conversation: a photo, then a shape. The answer about the shape is given (warned: a photo is
    # in the conversation); when the photo is the last picture sent, the model says so again.
    photo_first, shape_first = (Request("<image> <image> hi", images, settings)
                                for images in ([photo(0), like], [like, photo(0)]))
    for replies in (engine.generate([photo_first, shape_first]),
                    [engine.submit(r).result() for r in (photo_first, shape_first)]):
        assert replies[0].text != ONLY_SHAPES and replies[0].warning == WARNING
        assert replies[1].text == ONLY_SHAPES
    engine.close()

    photo(0).save(tmp_path / "photo.png")
    out = tmp_path / "rows.jsonl"
    assert vlm_main(["caption", str(tmp_path / "photo.png"), "--out", str(out), "--model", str(knows),
                     "--num-workers", "0", "--no-progress"]) == 0
    (row,) = map(json.loads, out.read_text().splitlines())
    assert row["caption"] == ONLY_SHAPES and row["warning"] == WARNING
    reply = ask_served_about_a_photo(knows, tmp_path)
    assert reply.choices[0].message.content == ONLY_SHAPES and reply.model_extra["warning"] == WARNING


def test_the_chat_keeps_the_warning_beside_the_answer_and_out_of_the_next_prompt():
    from vlm.serve.conversation import NOTICE_PREFIX, history_to_turns, note

    reply = "a red circle" + note(WARNING)
    assert reply == f"a red circle\n\n{NOTICE_PREFIX}This image is unlike the images this model was trained on; " \
                    "the answer may be unreliable."
    history = [{"role": "user", "content": "what is it?"}, {"role": "assistant", "content": reply}]
    assert history_to_turns(history)[0].reply == "a red circle"
