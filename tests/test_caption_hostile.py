"""Careless use of `vlm caption` / `vlm score`: two runs on one output, Excel CSVs, unwritable outputs."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from caption_files import cli_env, images_folder, rows_of
from vlm.serve.caption import main


def caption_command(folder, out, model_dir, *extra: str) -> list[str]:
    return [sys.executable, "-m", "vlm.cli", "caption", str(folder), "--out", str(out), "--model", str(model_dir),
            "--max-new-tokens", "3", "--num-workers", "0", "--no-progress", *extra]


def test_a_second_run_on_the_same_out_exits_naming_the_first(tmp_path, blip2_opt_dir):
    folder = images_folder(tmp_path / "imgs", 300)  # the first run must outlast the second's start-up
    out = tmp_path / "out.jsonl"
    first = subprocess.Popen(caption_command(folder, out, blip2_opt_dir, "--batch-size", "1", "--max-new-tokens", "8"),
                             env=cli_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and first.poll() is None and not (out.exists() and out.read_text().count("\n")):
        time.sleep(0.05)
    assert first.poll() is None, first.stderr.read()  # it is captioning: it holds the lock
    second = subprocess.run(caption_command(folder, out, blip2_opt_dir), env=cli_env(), capture_output=True,
                            text=True, timeout=120)
    assert first.wait(timeout=180) == 0, first.stderr.read()
    assert second.returncode == 1
    error = second.stderr.strip().splitlines()
    assert error == [f"error: {out}: another vlm caption run (PID {first.pid}) is writing it; wait for it to end, "
                     "or choose another --out"], second.stderr
    images = [r["image"] for r in rows_of(out)]
    assert sorted(images) == sorted(str(p) for p in folder.iterdir())  # each once: nothing done twice
    # The lock ends with the run: the same command now resumes (nothing left to do).
    again = subprocess.run(caption_command(folder, out, blip2_opt_dir), env=cli_env(), capture_output=True,
                           text=True, timeout=120)
    assert again.returncode == 0 and "skipped 300" in again.stderr, again.stderr


def test_a_csv_list_saved_by_excel_with_a_byte_order_mark(tmp_path, blip2_opt_dir):
    folder = images_folder(tmp_path / "imgs", 2)
    listing = tmp_path / "list.csv"
    listing.write_bytes("image,question\nimgs/img000.png,what is it?\nimgs/img001.png,\n".encode("utf-8-sig"))
    out = tmp_path / "out.jsonl"
    assert main([str(listing), "--out", str(out), "--model", str(blip2_opt_dir), "--max-new-tokens", "2",
                 "--num-workers", "0", "--no-progress"]) == 0
    rows = sorted(rows_of(out), key=lambda r: r["image"])
    assert [r["image"] for r in rows] == ["imgs/img000.png", "imgs/img001.png"]
    assert rows[0]["question"] == "what is it?" and "answer" in rows[0] and "caption" in rows[1]
    assert folder.exists()


def test_unwritable_outputs_are_one_line_errors(tmp_path, blip2_opt_dir):
    folder = images_folder(tmp_path / "imgs", 2)
    full = "/dev/full"  # every write fails with "No space left on device"
    lock = f"{full}.lock"
    left_before = os.path.exists(lock)
    try:
        result = subprocess.run(caption_command(folder, full, blip2_opt_dir), env=cli_env(), capture_output=True,
                                text=True, timeout=120)
    finally:
        if not left_before and os.path.exists(lock):
            os.unlink(lock)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == f"error: {full}: cannot write the output (No space left on device)"
    assert "Traceback" not in result.stderr

    not_a_folder = tmp_path / "a-file"
    not_a_folder.write_text("x")
    for out in (not_a_folder / "out.jsonl", "/proc/vlm-out.jsonl"):
        result = subprocess.run(caption_command(folder, out, blip2_opt_dir), env=cli_env(), capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 1, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {out}"), result.stderr
