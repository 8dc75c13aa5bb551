"""`vlm caption` parts: input listing, crash-safe writers, txt/CSV/VQA output, OOM splitting."""

from __future__ import annotations

import csv
import json
import os

import pytest
import torch

import tiny
from vlm.serve.caption import main
from vlm.serve.inputs import iter_items
from vlm.engine import InferenceEngine, OutOfMemory, split_on_oom
from vlm.serve.pipeline import BatchBuilder, caption_rows
from vlm.preprocess import FastPreprocess, make_preprocess
from vlm.serve.writers import CsvWriter, JsonlWriter, complete_length, iter_rows, read_done


def test_listing_folders_globs_and_lists(tmp_path):
    (tmp_path / "d" / "b").mkdir(parents=True)
    for name in ["d/z.png", "d/a.JPG", "d/b/c.webp", "d/notes.txt", "d/b/x.json"]:
        (tmp_path / name).write_bytes(b"x")
    items = list(iter_items([str(tmp_path / "d")]))
    assert [os.path.relpath(i.image, tmp_path) for i in items] == ["d/a.JPG", "d/z.png", "d/b/c.webp"]
    assert [i.image for i in iter_items([str(tmp_path / "d" / "*.png")])] == [str(tmp_path / "d" / "z.png")]
    assert len(list(iter_items([str(tmp_path / "d" / "**" / "*.webp")]))) == 1

    sub = tmp_path / "lists"
    sub.mkdir()
    (sub / "l.txt").write_text("# a comment\n../d/z.png\n\n/abs/path.jpg\n")
    txt = list(iter_items([str(sub / "l.txt")]))
    assert [(i.image, i.path) for i in txt] == [("../d/z.png", str(sub / "../d/z.png")), ("/abs/path.jpg", "/abs/path.jpg")]
    with open(sub / "l.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerows([["image", "question"], ["../d/z.png", "what colour, \"really\"?"], ["../d/a.JPG", ""]])
    rows = list(iter_items([str(sub / "l.csv")]))
    assert rows[0].question == 'what colour, "really"?' and rows[1].question is None
    (sub / "l.jsonl").write_text('{"image": "a.png", "prompt": "a photo of"}\nnot json\n{"prompt": "x"}\n')
    items = list(iter_items([str(sub / "l.jsonl")]))
    assert items[0].prompt == "a photo of" and items[0].path == str(sub / "a.png")
    assert "not valid JSON" in items[1].error and "l.jsonl:2" in items[1].image
    assert "no 'image'" in items[2].error


def test_half_written_records_are_ignored_and_cut(tmp_path):
    path = tmp_path / "o.jsonl"
    w = JsonlWriter(str(path))
    w.write([{"image": "a", "caption": "x"}, {"image": "b", "error": "bad"}])
    w.close()
    with open(path, "a") as f:
        f.write('{"image": "c", "capt')
    assert read_done([str(path)]) == {(os.path.abspath("a"), None, None, None), (os.path.abspath("b"), None, None, None)}
    JsonlWriter(str(path)).close()  # opening for append cuts the tail
    assert path.read_text().count("\n") == 2 and path.read_text().endswith("}\n")

    # CSV: a caption with quotes and newlines, then a record cut inside its quoted field.
    cpath = tmp_path / "o.csv"
    w = CsvWriter(str(cpath))
    w.write([{"image": "p q.png", "caption": 'two\nlines, "quoted"'}, {"image": "r.png", "question": "q?", "answer": "a"}])
    w.close()
    good = cpath.stat().st_size
    with open(cpath, "a") as f:
        f.write('s.png,,,"half a\ncaption')
    assert complete_length(str(cpath), quoted=True) == good
    rows = list(iter_rows(str(cpath), "csv"))
    assert rows == [{"image": "p q.png", "caption": 'two\nlines, "quoted"'},
                    {"image": "r.png", "question": "q?", "answer": "a"}]
    CsvWriter(str(cpath)).close()
    assert cpath.stat().st_size == good


def test_split_on_oom_retries_halves_and_other_errors_stop_the_run():
    calls, emptied = [], []

    def run(indices):
        calls.append(len(indices))
        if len(indices) > 2 or 5 in indices:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return [f"t{i}" for i in indices]

    out = split_on_oom(run, list(range(8)), on_oom=lambda: emptied.append(1))
    assert out[:5] == ["t0", "t1", "t2", "t3", "t4"] and out[6:] == ["t6", "t7"]
    assert isinstance(out[5], OutOfMemory) and "even alone" in str(out[5])  # that item's error, a new one:
    assert out[5].__traceback__ is None  # torch's would hold the failed try's activations
    assert calls[:3] == [8, 4, 2] and len(emptied) == 5  # cache emptied after every out-of-memory

    def broken(indices):
        raise RuntimeError("CUDA error: device-side assert triggered")

    calls.clear()
    with pytest.raises(RuntimeError, match="device-side assert"):
        split_on_oom(broken, list(range(8)))


def test_fast_preprocess_is_exact():
    ip = tiny.image_processor()
    fast = make_preprocess(ip)
    assert isinstance(fast, FastPreprocess)
    for size in [(1, 1), (300, 7), (45, 45)]:
        image = tiny.random_image(3, size)
        assert torch.equal(fast(image), ip([image], return_tensors="pt")["pixel_values"][0])


def test_questions_share_one_image_encoding(tmp_path, blip2_opt_dir):
    from vlm import load_pretrained

    tiny.random_image(0).save(tmp_path / "cat.png")
    tiny.random_image(1).save(tmp_path / "dog.png")
    listing = tmp_path / "q.jsonl"
    questions = ["is there a cat?", "what colour is the shape?", "what shape is it?"]
    lines = [{"image": "cat.png", "question": q} for q in questions] + [{"image": "dog.png"}]
    listing.write_text("".join(json.dumps(x) + "\n" for x in lines))
    model, processor = load_pretrained(str(blip2_opt_dir))
    builder = BatchBuilder(processor, prompt="a photo of")
    batch = builder[list(iter_items([str(listing)]))]
    cats = [r.images[0] for r in batch.requests[:3]]
    assert cats[0] is cats[1] is cats[2]  # the cat is decoded once for 3 questions
    engine = InferenceEngine(model, processor)
    rows = caption_rows(engine, batch, builder)
    assert engine.encoder.vision_encodes == 2 and [bool(r.get("answer")) for r in rows] == [True, True, True, False]

    out = tmp_path / "out.csv"
    assert main([str(listing), "--out", str(out), "--model", str(blip2_opt_dir), "--max-new-tokens", "3",
                 "--num-workers", "0", "--no-progress"]) == 0
    rows = list(iter_rows(str(out), "csv"))
    assert [r.get("question") for r in rows] == [*questions, None]
    assert all(r.get("answer") for r in rows[:3]) and rows[3].get("caption")
    with open(out, newline="") as f:
        assert next(csv.reader(f)) == ["image", "prompt", "question", "caption", "answer", "error", "path", "warning"]


def test_txt_format_writes_beside_images_never_overwrites(tmp_path, blip2_opt_dir):
    for i in range(3):
        tiny.random_image(i).save(tmp_path / f"im{i}.png")
    (tmp_path / "im1.txt").write_text("my own caption\n")
    tiny.random_image(9).save(tmp_path / "im2.jpg")  # same stem as im2.png: one caption file
    args = [str(tmp_path), "--format", "txt", "--model", str(blip2_opt_dir), "--max-new-tokens", "3",
            "--num-workers", "0", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "log.jsonl")]) == 0
    assert (tmp_path / "im1.txt").read_text() == "my own caption\n"
    assert (tmp_path / "im0.txt").read_text().strip()
    log = {r["image"]: r for r in iter_rows(str(tmp_path / "log.jsonl"))}
    assert str(tmp_path / "im1.png") not in log  # skipped: its caption file exists
    clash = [r for r in log.values() if "error" in r]
    assert len(clash) == 1 and "caption file exists" in clash[0]["error"]
    assert main([*args, "--overwrite"]) == 0
    assert (tmp_path / "im1.txt").read_text() != "my own caption\n"
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(SystemExit):
        main([*args, "--question", "what?"])
