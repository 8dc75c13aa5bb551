"""`vlm eval` end to end on tiny real checkpoints: structure, predictions equal model.generate,
known-answer scores, and bad data failing before the model loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import random_image

from vlm import load_pretrained
from vlm.cli import main as vlm_main

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ["what colour is it?", "is there a cat?", "what shape is the thing on the white background?"]


def write_vqa(folder: Path, answers: list[list[str]] | None = None) -> Path:
    rows = []
    for i, q in enumerate(QUESTIONS):
        random_image(i).save(folder / f"{i}.png")
        rows.append({"image": f"{i}.png", "question": q, "answers": (answers or [["red"] * 10] * 3)[i],
                     "question_type": "what" if i != 1 else "is there", "question_id": 100 + i})
    path = folder / "vqa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def generate_one_by_one(model_dir: Path, prompts_of, images) -> list[str]:
    """What model.generate gives for each sample alone (batch of 1: no padding involved)."""
    model, processor = load_pretrained(str(model_dir), device="cpu")
    out = []
    for image, prompt in zip(images, prompts_of(processor)):
        inputs = processor(images=[image], text=[prompt])
        with torch.inference_mode():
            seq = model.generate(**inputs, max_new_tokens=4, num_beams=1, do_sample=False, min_new_tokens=0)
        out += processor.decode_generated(seq, inputs["input_ids"])
    return out


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_eval_vqa_subprocess_matches_generate_and_known_answers(tiny_vlm_dir, tmp_path):
    data = write_vqa(tmp_path)
    preds = tmp_path / "out" / "preds.jsonl"
    cmd = [sys.executable, "-m", "vlm.cli", "eval", "--model", str(tiny_vlm_dir), "--data", str(data), "--task", "vqa",
           "--out", str(preds), "--batch-size", "2", "--num-beams", "1", "--max-new-tokens", "4", "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    assert summary["task"] == "vqa" and summary["samples"] == 3 and summary["skipped_bad_images"] == 0
    assert summary["generation"] == {"num_beams": 1, "max_new_tokens": 4, "min_new_tokens": 0}
    types = summary["metrics"]["per_question_type"]
    assert set(types) == {"what", "is there"} and types["what"]["count"] == 2 and types["is there"]["count"] == 1
    records = read_jsonl(preds)
    assert [r["question"] for r in records] == QUESTIONS and [r["question_id"] for r in records] == [100, 101, 102]

    # Batched, left-padded generation (questions of different lengths) == one sample at a time.
    images = [random_image(i) for i in range(3)]
    expected = generate_one_by_one(tiny_vlm_dir, lambda p: [p.format_question(q) for q in QUESTIONS], images)
    assert [r["prediction"] for r in records] == expected

    # Known answers: 10 humans said the model's own answer for sample 0 -> 100; 2 of 10 for sample 1
    # -> 60; nobody for sample 2 -> 0. Mean 53.33.
    answers = [[expected[0]] * 10, [expected[1]] * 2 + ["zzz"] * 8, ["zzz"] * 10]
    data2 = write_vqa(tmp_path, answers)
    assert vlm_main(["eval", "--model", str(tiny_vlm_dir), "--data", str(data2), "--task", "vqa", "--out", str(preds),
                     "--num-beams", "1", "--max-new-tokens", "4", "--device", "cpu"]) == 0
    assert [r["accuracy"] for r in read_jsonl(preds)] == pytest.approx([100.0, 60.0, 0.0])


def test_eval_caption_groups_references_and_scores_known_answers(blip2_opt_dir, tmp_path, capsys):
    for i in range(2):
        random_image(10 + i).save(tmp_path / f"{i}.png")
    coco = {"images": [{"id": 1, "file_name": "0.png"}, {"id": 2, "file_name": "1.png"}],
            "annotations": [{"image_id": 1, "caption": "a red circle"}, {"image_id": 2, "caption": "a blue square"},
                            {"image_id": 1, "caption": "a circle"}]}
    (tmp_path / "captions.json").write_text(json.dumps(coco))
    preds = tmp_path / "preds.jsonl"
    argv = ["eval", "--model", str(blip2_opt_dir), "--task", "caption", "--out", str(preds), "--batch-size", "2",
            "--num-beams", "1", "--max-new-tokens", "4", "--min-new-tokens", "0", "--device", "cpu"]
    assert vlm_main([*argv, "--data", str(tmp_path / "captions.json")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["samples"] == 2  # one sample per image, not per caption
    assert set(summary["metrics"]) == {"CIDEr", "BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "exact_match"}
    records = read_jsonl(preds)
    assert [r["references"] for r in records] == [["a red circle", "a circle"], ["a blue square"]]
    expected = generate_one_by_one(blip2_opt_dir, lambda p: [p.caption_prompt] * 2,
                                   [random_image(10), random_image(11)])
    assert [r["prediction"] for r in records] == expected

    # References equal to the predictions: every n-gram matches, BLEU-1 is 100.
    assert all(expected)  # seeded weights: the tiny model says something for both images
    rows = [{"image": f"{i}.png", "text": expected[i]} for i in range(2)]
    (tmp_path / "self.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert vlm_main([*argv, "--data", str(tmp_path / "self.jsonl")]) == 0
    metrics = json.loads(capsys.readouterr().out)["metrics"]
    assert metrics["BLEU-1"] == pytest.approx(100.0, abs=1e-4) and metrics["exact_match"] == 100.0


def test_eval_bad_data_fails_before_loading_the_model(tmp_path, capsys):
    random_image(0).save(tmp_path / "a.png")
    (tmp_path / "d.jsonl").write_text(json.dumps({"image": "a.png", "question": "q", "answer": "a"}) + "\n"
                                      + json.dumps({"image": "gone.png", "question": "q", "answer": "a"}) + "\n")
    # The model path does not exist either: the data error must come first.
    argv = ["eval", "--model", str(tmp_path / "no-model"), "--data", str(tmp_path / "d.jsonl"), "--task", "vqa"]
    assert vlm_main(argv) == 1
    err = capsys.readouterr().err
    assert "d.jsonl:2" in err and "gone.png" in err and err.startswith("error: ")
    assert vlm_main([*argv[:-2], "--task", "caption"]) == 1
    assert "missing field 'text'" in capsys.readouterr().err
    assert vlm_main([*argv, "--batch-size", "0"]) == 1
    assert "--batch-size" in capsys.readouterr().err


def test_eval_skip_bad_images_reports_the_count(tiny_vlm_dir, tmp_path, capsys):
    random_image(0).save(tmp_path / "a.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    rows = [{"image": "a.png", "text": "x"}, {"image": "broken.png", "text": "y"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["eval", "--model", str(tiny_vlm_dir), "--data", str(tmp_path / "d.jsonl"), "--task", "caption",
            "--num-beams", "1", "--max-new-tokens", "2", "--device", "cpu"]
    assert vlm_main(argv) == 1
    assert "broken.png" in capsys.readouterr().err
    assert vlm_main([*argv, "--skip-bad-images"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["samples"] == 1 and summary["skipped_bad_images"] == 1


def test_eval_help():
    run = subprocess.run([sys.executable, "-m", "vlm.cli", "eval", "--help"], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0 and "--num-beams" in run.stdout and "CIDEr" in run.stdout


def test_eval_caption_groups_in_memory_images_by_pixels(blip2_opt_dir, tmp_path, capsys):
    """A datasets folder decodes each row's image anew; rows of one image are still one sample."""
    import datasets

    images = [random_image(20), random_image(21), random_image(20)]
    ds = datasets.Dataset.from_dict({"image": images, "text": ["a red circle", "a blue square", "a circle"]},
                                    features=datasets.Features({"image": datasets.Image(),
                                                                "text": datasets.Value("string")}))
    datasets.DatasetDict({"test": ds}).save_to_disk(str(tmp_path / "ds"))
    preds = tmp_path / "preds.jsonl"
    assert vlm_main(["eval", "--model", str(blip2_opt_dir), "--data", str(tmp_path / "ds"), "--task", "caption",
                     "--out", str(preds), "--num-beams", "1", "--max-new-tokens", "2", "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["samples"] == 2
    assert [r["references"] for r in read_jsonl(preds)] == [["a red circle", "a circle"], ["a blue square"]]
