"""`vlm caption`: awkward files, resume after SIGKILL, multi-process, parity with transformers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import Blip2ForConditionalGeneration, Blip2Processor

import tiny
from caption_files import cli_env, images_folder, make_awkward_folder, rows_of
from vlm.serve.caption import main

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["a photo of", "", "question: is there a cat? short answer:", "the quick brown fox"]


def test_awkward_files_one_row_each(tmp_path, blip2_opt_dir, capsys):
    expected = make_awkward_folder(tmp_path / "awkward")
    out = tmp_path / "out.jsonl"
    code = main([str(tmp_path / "awkward"), "--out", str(out), "--model", str(blip2_opt_dir),
                 "--max-new-tokens", "4", "--batch-size", "4", "--num-workers", "1"])
    assert code == 0
    rows = rows_of(out)
    by_name = {os.path.relpath(r["image"], tmp_path / "awkward"): r for r in rows}
    assert len(rows) == len(by_name) == len(expected)
    for name, ok in expected.items():
        row = by_name[name]
        assert ("caption" in row) == ok, row
        assert ("error" in row) == (not ok), row
        if not ok:
            assert name in row["error"]  # the error names the file
    summary = capsys.readouterr().err
    assert f"captioned {sum(expected.values())}, errors {len(expected) - sum(expected.values())}" in summary

    # Re-run: everything is already done, nothing is appended, exit 0.
    assert main([str(tmp_path / "awkward"), "--out", str(out), "--model", str(blip2_opt_dir),
                 "--num-workers", "0"]) == 0
    assert len(rows_of(out)) == len(expected)
    assert f"skipped {len(expected)}" in capsys.readouterr().err


def test_sigkill_then_resume_every_image_once(tmp_path, blip2_opt_dir):
    folder = images_folder(tmp_path / "imgs", 40)
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "vlm.cli", "caption", str(folder), "--out", str(out), "--model", str(blip2_opt_dir),
           "--max-new-tokens", "3", "--batch-size", "1", "--num-workers", "0", "--no-progress"]
    proc = subprocess.Popen(cmd, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if out.exists() and out.read_text().count("\n") >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read().decode()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = rows_of(out)
    assert 3 <= len(before) < 40
    # What a kill in the middle of a write leaves: half a JSON line, no newline.
    with open(out, "a") as f:
        f.write('{"image": "' + str(folder / "img039.png")[:10])
    assert main([str(folder), "--out", str(out), "--model", str(blip2_opt_dir), "--max-new-tokens", "3",
                 "--num-workers", "0", "--no-progress"]) == 0
    images = [r["image"] for r in rows_of(out)]
    assert sorted(images) == sorted(str(p) for p in folder.iterdir())
    assert all(line.startswith("{") and line.endswith("}") for line in out.read_text().splitlines())
    assert [r for r in rows_of(out)][: len(before)] == before  # earlier rows untouched


def test_two_processes_same_rows_as_one(tmp_path, blip2_opt_dir):
    folder = images_folder(tmp_path / "imgs", 9)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    common = [str(folder), "--model", str(blip2_opt_dir), "--max-new-tokens", "4", "--batch-size", "2",
              "--num-workers", "0", "--no-progress"]
    one = tmp_path / "one.jsonl"
    assert main([*common, "--out", str(one)]) == 0
    two = tmp_path / "two.jsonl"
    env = cli_env()
    env.update(OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
         "-m", "vlm.cli", "caption", *common, "--out", str(two)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    key = lambda r: r["image"]  # noqa: E731
    assert sorted(rows_of(two), key=key) == sorted(rows_of(one), key=key)
    assert len(rows_of(two)) == 10
    assert not list(tmp_path.glob("two.jsonl.part*"))  # parts merged and removed


def reference_captions(model_dir: Path, images, prompts, max_new_tokens: int, batched: bool) -> list[str]:
    """transformers' own pipeline: Blip2Processor (left padding) + Blip2ForConditionalGeneration."""
    model = Blip2ForConditionalGeneration.from_pretrained(model_dir).eval()
    processor = Blip2Processor.from_pretrained(model_dir)
    processor.tokenizer.padding_side = "left"
    groups = [(images, prompts)] if batched else [([im], [p]) for im, p in zip(images, prompts)]
    texts = []
    for ims, ps in groups:
        enc = processor(images=ims, text=ps, padding=True, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
        texts += [t.strip() for t in processor.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)]
    return texts


@pytest.mark.parametrize("fixture", ["blip2_opt_dir", "blip2_llama_dir"])
def test_cli_matches_transformers_blip2(tmp_path, fixture, request):
    model_dir = request.getfixturevalue(fixture)
    folder = images_folder(tmp_path / "imgs", 6)
    names = sorted(p.name for p in folder.iterdir())
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(names))]
    listing = tmp_path / "list.jsonl"
    listing.write_text("".join(json.dumps({"image": f"imgs/{n}", "prompt": p}) + "\n" for n, p in zip(names, prompts)))
    out = tmp_path / "out.jsonl"
    assert main([str(listing), "--out", str(out), "--model", str(model_dir), "--max-new-tokens", "6",
                 "--batch-size", "6", "--num-workers", "0", "--no-progress"]) == 0
    rows = rows_of(out)
    assert [r["image"] for r in rows] == [f"imgs/{n}" for n in names]  # as given, in order
    from PIL import Image

    images = [Image.open(folder / n).convert("RGB") for n in names]
    single = reference_captions(model_dir, images, prompts, 6, batched=False)
    batched = reference_captions(model_dir, images, prompts, 6, batched=True)
    ours = [r["caption"] for r in rows]
    assert ours == single
    assert ours == batched
    assert len(set(ours)) > 1  # the prompts and images really differ

    # One image at a time through the CLI gives the same captions too.
    out1 = tmp_path / "one.jsonl"
    assert main([str(listing), "--out", str(out1), "--model", str(model_dir), "--max-new-tokens", "6",
                 "--batch-size", "1", "--num-workers", "0", "--no-progress"]) == 0
    assert [r["caption"] for r in rows_of(out1)] == single


def test_exit_codes(tmp_path, blip2_opt_dir, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.jpg").write_bytes(b"")
    (bad / "b.png").write_text("no")
    out = tmp_path / "out.jsonl"
    assert main([str(bad), "--out", str(out), "--model", str(blip2_opt_dir), "--num-workers", "0"]) == 1
    assert len(rows_of(out)) == 2 and all("error" in r for r in rows_of(out))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(empty), "--out", str(tmp_path / "e.jsonl"), "--model", str(blip2_opt_dir)]) == 1
    assert "no images found" in capsys.readouterr().err
    # --max-error-rate: 2 bad of 3 is over the default half, within 0.7.
    tiny.random_image(0).save(bad / "c.png")
    mixed = ["--model", str(blip2_opt_dir), "--num-workers", "0", "--max-new-tokens", "2", "--overwrite"]
    assert main([str(bad), "--out", str(out), *mixed]) == 1
    assert "2 of 3 images failed, over --max-error-rate 0.5" in capsys.readouterr().err
    assert main([str(bad), "--out", str(out), *mixed, "--max-error-rate", "0.7"]) == 0
    assert sorted("error" in r for r in rows_of(out)) == [False, True, True]
    with pytest.raises(SystemExit) as e:
        main([str(bad), "--out", str(out), "--batch-size", "0"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main([str(bad)])  # no --out
    assert e.value.code == 2
    # Through the real command: a missing input is one line, exit 1, before any model loads.
    result = subprocess.run([sys.executable, "-m", "vlm.cli", "caption", str(tmp_path / "nope"), "--out", str(out)],
                            env=cli_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: {tmp_path / 'nope'}: no such file or folder"


def test_question_flag_resumes(tmp_path, blip2_opt_dir, capsys):
    """With --question, a re-run skips answered images (the key is the question written)."""
    folder = images_folder(tmp_path / "imgs", 2)
    out = tmp_path / "out.jsonl"
    args = [str(folder), "--out", str(out), "--model", str(blip2_opt_dir), "--max-new-tokens", "3",
            "--num-workers", "0", "--no-progress"]
    assert main([*args, "--question", "what is it?"]) == 0
    first = rows_of(out)
    assert len(first) == 2 and all(r["question"] == "what is it?" and "answer" in r for r in first)
    capsys.readouterr()
    images_folder(folder, 1, start=2)  # one new image since the first run (as after a kill)
    assert main([*args, "--question", "what is it?"]) == 0
    rows = rows_of(out)
    assert rows[:2] == first and len(rows) == 3
    assert sorted(r["image"] for r in rows) == sorted(str(p) for p in folder.iterdir())
    assert "captioned 1, errors 0, skipped 2" in capsys.readouterr().err
    # A different question is new work for every image; the first question's rows stay done.
    assert main([*args, "--question", "what colour?"]) == 0
    assert "captioned 3, errors 0, skipped 0" in capsys.readouterr().err
    assert main([*args, "--question", "what colour?"]) == 0
    assert "captioned 0, errors 0, skipped 3" in capsys.readouterr().err
    assert len(rows_of(out)) == 6


def test_mixed_prompts_and_markers_in_one_batch(tmp_path, tiny_vlm_dir):
    """Questions (chat template: an <image> marker), prompts with a marker and without, one batch."""
    import shutil

    model = tmp_path / "strict-vlm"
    shutil.copytree(tiny_vlm_dir, model)
    # A real chat template that refuses some content, as templates with raise_exception do.
    refuse = "{% for m in messages %}{% if 'forbidden' in m['content'] %}{{ raise_exception('refused') }}{% endif %}{% endfor %}"
    (model / "chat_template.jinja").write_text(refuse + tiny.CHAT_TEMPLATE)
    images_folder(tmp_path / "imgs", 6)
    entries = [
        {"image": "imgs/img000.png", "question": "what is it?"},
        {"image": "imgs/img001.png", "prompt": "Describe <image> briefly:"},
        {"image": "imgs/img002.png"},
        {"image": "imgs/img003.png", "prompt": "a photo of"},
        {"image": "imgs/img004.png", "prompt": "<image> and <image>"},
        {"image": "imgs/img005.png", "question": "is it forbidden?"},
        {"image": "imgs/img000.png", "prompt": "<image> a photo of"},
    ]
    listing = tmp_path / "list.jsonl"
    listing.write_text("".join(json.dumps(e) + "\n" for e in entries))
    common = [str(listing), "--model", str(model), "--max-new-tokens", "4", "--num-workers", "0", "--no-progress"]
    batched, single = tmp_path / "batched.jsonl", tmp_path / "single.jsonl"
    assert main([*common, "--batch-size", "8", "--out", str(batched)]) == 0
    assert main([*common, "--batch-size", "1", "--out", str(single)]) == 0
    rows = rows_of(batched)
    assert [r["image"] for r in rows] == [e["image"] for e in entries]  # one row each, in order
    assert rows == rows_of(single)  # each prompt handled on its own, whatever shares its batch
    ok = [0, 1, 2, 3, 6]
    assert all(("answer" if "question" in entries[i] else "caption") in rows[i] for i in ok), rows
    assert rows[1]["prompt"] == "Describe <image> briefly:"
    assert "2 <image> markers" in rows[4]["error"] and rows[4]["prompt"] == "<image> and <image>"
    assert "refused" in rows[5]["error"] and rows[5]["question"] == "is it forbidden?"


def test_same_relative_name_in_two_lists(tmp_path, blip2_opt_dir, capsys):
    """`a.png` in two list files is two files; the same file named twice is one."""
    for n, sub in enumerate(["l1", "l2"]):
        (tmp_path / sub).mkdir()
        tiny.random_image(n, (30, 30)).save(tmp_path / sub / "a.png")
    (tmp_path / "l1" / "list.txt").write_text("a.png\n")
    (tmp_path / "l2" / "list.jsonl").write_text('{"image": "a.png"}\n')
    (tmp_path / "both.txt").write_text("l1/a.png\n")  # the same file as l1's entry
    out = tmp_path / "out.csv"
    args = [str(tmp_path / "l1" / "list.txt"), str(tmp_path / "l2" / "list.jsonl"), str(tmp_path / "both.txt"),
            "--out", str(out), "--model", str(blip2_opt_dir), "--max-new-tokens", "3", "--num-workers", "0",
            "--no-progress"]
    assert main(args) == 0
    rows = rows_of(out)
    assert [r["image"] for r in rows] == ["a.png", "a.png"]  # as given
    assert [r["path"] for r in rows] == [str(tmp_path / "l1" / "a.png"), str(tmp_path / "l2" / "a.png")]
    assert all(r.get("caption") for r in rows)
    assert "captioned 2, errors 0, skipped 1" in capsys.readouterr().err
    assert main(args) == 0  # resume: all three entries are done
    assert "captioned 0, errors 0, skipped 3" in capsys.readouterr().err
    assert len(rows_of(out)) == 2


def test_dtype_flag_loads_the_llm_in_bf16(tmp_path, blip2_opt_dir, monkeypatch):
    import vlm.loading

    seen = {}
    real = vlm.loading.load_pretrained

    def spy(*args, **kwargs):  # the real loader; we only record what it built
        model, processor = real(*args, **kwargs)
        seen["dtype"] = model.language_model.dtype
        return model, processor

    monkeypatch.setattr(vlm.loading, "load_pretrained", spy)
    folder = images_folder(tmp_path / "imgs", 3)
    out = tmp_path / "out.jsonl"
    assert main([str(folder), "--out", str(out), "--model", str(blip2_opt_dir), "--dtype", "bfloat16",
                 "--max-new-tokens", "4", "--num-workers", "0", "--no-progress"]) == 0
    assert seen["dtype"] == torch.bfloat16
    assert len(rows_of(out)) == 3 and all(isinstance(r["caption"], str) for r in rows_of(out))
