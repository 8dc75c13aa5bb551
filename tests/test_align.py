"""The `align` recipe (train/align.py): a bridge-only first stage scored through the LLM's word embeddings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from train_data import CAPTIONS, shape_image, write_caption_data

import tiny
from vlm.train.align import bag_of_words_loss
from vlm.train.collate import IGNORE_INDEX
from vlm import load_pretrained
from vlm.cli import main as vlm_main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def caption_batch(processor, image_index: int, captions: list[str]) -> dict:
    """One row per caption, all showing image `image_index`; labels are the caption's tokens."""
    rows = [processor.tokenizer(c, add_special_tokens=False)["input_ids"] for c in captions]
    width = max(map(len, rows))
    labels = torch.tensor([r + [IGNORE_INDEX] * (width - len(r)) for r in rows])
    pixels = processor.image_processor([shape_image(image_index)] * len(captions), return_tensors="pt")["pixel_values"]
    return {"pixel_values": pixels, "labels": labels}


def per_caption_loss(model, processor, image_index: int) -> list[float]:
    with torch.no_grad():
        return [bag_of_words_loss(model, caption_batch(processor, image_index, [c])).item() for c in CAPTIONS]


def test_loss_is_the_mixture_of_distance_softmaxes(tiny_vlm_dir):
    """The fast form (dot products) equals softmax(-|query - embedding|^2) computed with explicit distances."""
    model, processor = load_pretrained(str(tiny_vlm_dir), device="cpu")
    batch = caption_batch(processor, 0, CAPTIONS)
    with torch.no_grad():
        loss = bag_of_words_loss(model, batch)
        soft = model.get_image_features(pixel_values=batch["pixel_values"])  # (rows, queries, width)
        embeddings = model.get_input_embeddings().weight
        probs = torch.softmax(-torch.cdist(soft, embeddings[None]) ** 2, dim=-1).mean(dim=1)  # (rows, vocab)
    labels = batch["labels"]
    picked = [probs[row, token] for row in range(len(CAPTIONS)) for token in labels[row] if token != IGNORE_INDEX]
    expected = -torch.log(torch.stack(picked)).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)


def test_align_puts_each_images_caption_words_into_its_soft_prompt(tmp_path):
    base = tiny.save_tiny_vlm(tmp_path / "base", num_query_tokens=4)
    data = write_caption_data(tmp_path / "data")
    model, processor = load_pretrained(str(base), device="cpu")
    before = [per_caption_loss(model, processor, i) for i in range(len(CAPTIONS))]
    out = tmp_path / "align"
    argv = [
        "train", "--recipe", "align", "--model", str(base), "--train-data", str(data), "--output-dir", str(out),
        "--max-steps", "60", "--batch-size", "4", "--learning-rate", "1e-2", "warmup=0", "lr_scheduler=constant",
        "logging_steps=100", "save_steps=1000", "report_to=none", "data.num_workers=0",
    ]
    assert vlm_main(argv) == 0
    # A complete checkpoint whose LLM and vision tower are the base's: only the bridge trained.
    assert (out / "config.json").is_file()
    model, processor = load_pretrained(str(out), device="cpu")
    after = [per_caption_loss(model, processor, i) for i in range(len(CAPTIONS))]
    # Each image's soft prompt now holds its own caption's words best of the four ...
    assert [min(range(len(CAPTIONS)), key=row.__getitem__) for row in after] == list(range(len(CAPTIONS)))
    # ... and far better than before training, when the prompts did not tell the images apart.
    n = len(CAPTIONS)
    assert sum(after[i][i] for i in range(n)) < 0.5 * sum(before[i][i] for i in range(n))
    base_model, _ = load_pretrained(str(base), device="cpu")
    for part in ("language_model", "vision_model"):
        trained = getattr(model, part).state_dict()
        for name, tensor in getattr(base_model, part).state_dict().items():
            torch.testing.assert_close(trained[name], tensor, msg=f"{part}.{name}")


def test_align_output_starts_a_lora_run(tmp_path):
    """Stage 2 (lora + bridge) takes the align output as its base model."""
    base = tiny.save_tiny_vlm(tmp_path / "base", num_query_tokens=4)
    data = write_caption_data(tmp_path / "data")
    common = ["--train-data", str(data), "--max-steps", "2", "--batch-size", "4", "report_to=none",
              "data.num_workers=0", "save_steps=1000"]
    assert vlm_main(["train", "--recipe", "align", "--model", str(base), "--output-dir", str(tmp_path / "s1"), *common]) == 0
    assert vlm_main(["train", "--recipe", "lora", "--model", str(tmp_path / "s1"), "--output-dir", str(tmp_path / "s2"),
                     *common]) == 0
    adapter = json.loads((tmp_path / "s2" / "adapter_config.json").read_text())
    assert Path(adapter["base_model_name_or_path"]) == tmp_path / "s1"
    load_pretrained(str(tmp_path / "s2"), device="cpu")


def test_align_refuses_rows_that_are_not_captions(tmp_path, capsys):
    base = tiny.save_tiny_vlm(tmp_path / "base", num_query_tokens=4)
    data = write_caption_data(tmp_path / "data")
    with open(data, "a") as f:
        f.write(json.dumps({"image": "img0.png", "question": "what colour?", "answer": "red"}) + "\n")
    argv = ["train", "--recipe", "align", "--model", str(base), "--train-data", str(data),
            "--output-dir", str(tmp_path / "o"), "report_to=none"]
    assert vlm_main(argv) == 1
    err = capsys.readouterr().err
    assert "captions.jsonl:5" in err and "vqa row" in err and "align" in err
