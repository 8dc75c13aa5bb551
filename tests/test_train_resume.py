"""Crash safety and multi-process training, with real subprocesses.

- a run killed with SIGKILL mid-training resumes (automatically, from the newest complete
  checkpoint) to the same final weights as an uninterrupted run with the same seed;
- a 2-process CPU run under `accelerate launch` (gloo, ~12 s) gives the same weights as a 1-process
  run on the same global batch.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tiny
from vlm.train.trainer import find_resume_checkpoint, replace_dir
from vlm.cli import main as vlm_main

REPO = Path(__file__).parent.parent
WORDS = ["red", "blue", "green", "cat", "dog", "sofa", "coffee", "rocket"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    return tiny.save_tiny_vlm(tmp_path_factory.mktemp("resume-base"), num_query_tokens=4)


@pytest.fixture(scope="module")
def no_dropout_base(tmp_path_factory) -> Path:
    """The tiny model with Q-Former dropout off: dropout masks differ between 1 and 2 processes."""
    path = tiny.save_tiny_vlm(tmp_path_factory.mktemp("ddp-base"), num_query_tokens=4)
    config = json.loads((path / "config.json").read_text())
    config["qformer_config"].update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("resume-data")
    with open(folder / "train.jsonl", "w") as f:
        for i, word in enumerate(WORDS):
            tiny.random_image(i).save(folder / f"{i}.png")
            f.write(json.dumps({"image": f"{i}.png", "text": f"a {word} on a white background"}) + "\n")
    return folder / "train.jsonl"


def subprocess_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    weights = load_file(out / "adapter_model.safetensors")
    weights.update({f"bridge.{k}": v for k, v in load_file(out / "bridge.safetensors").items()})
    return weights


def assert_same_weights(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=1e-4, msg=lambda m: f"{key}: {m}")


def train_args(base: Path, data: Path, out: Path, *extra: str) -> list[str]:
    # LoRA + bridge; warmup + cosine and Q-Former dropout make the scheduler and RNG state matter.
    return [
        "--recipe", "lora", "--model", str(base), "--train-data", str(data), "--output-dir", str(out),
        "--max-steps", "30", "--batch-size", "2", "--learning-rate", "5e-3", "--save-steps", "5",
        "warmup=4", "lr_scheduler=cosine", "report_to=none", "logging_steps=100", "save_total_limit=2",
        "lora.r=4", *extra,
    ]


def test_sigkill_mid_training_resumes_to_the_same_weights(base_dir, data_file, tmp_path):
    reference = tmp_path / "reference"
    # Two DataLoader workers in every run (same RNG use): images are decoded in subprocesses.
    assert vlm_main(["train", *train_args(base_dir, data_file, reference, "data.num_workers=2")]) == 0

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "vlm.cli", "train", *train_args(base_dir, data_file, out, "data.num_workers=2")]
    proc = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    staging, third = out / ".partial" / "checkpoint-15", out / "checkpoint-15"
    deadline = time.monotonic() + 120
    try:
        # Kill while the third checkpoint is being written if we catch it, else right after it.
        while not (staging.exists() or third.exists()):
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the training subprocess made no checkpoint in 120 s"
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "adapter_config.json").exists()  # killed before the end
    complete = sorted(p.name for p in out.glob("checkpoint-*"))
    assert "checkpoint-10" in complete
    for name in complete:  # every visible checkpoint is whole
        assert (out / name / "trainable.safetensors").is_file() and (out / name / "trainer_state.json").is_file()

    # Same command again: resumes by itself from the newest complete checkpoint.
    assert vlm_main(["train", *train_args(base_dir, data_file, out, "data.num_workers=2")]) == 0
    state = json.loads((out / "checkpoint-30" / "trainer_state.json").read_text())
    assert state["global_step"] == 30
    assert not (out / ".partial").exists() or not any((out / ".partial").iterdir())
    assert_same_weights(final_weights(out), final_weights(reference), atol=1e-5)


def test_resume_from_a_named_checkpoint_and_no_resume(base_dir, data_file, tmp_path, capsys):
    out = tmp_path / "o"
    args = train_args(base_dir, data_file, out, "data.num_workers=0")
    assert vlm_main(["train", *args, "--max-steps", "10"]) == 0
    capsys.readouterr()
    # A folder that looks like a later checkpoint but lacks the optimizer state (a save killed
    # half-way by an older tool) is never picked, and is an error when named.
    shutil.copytree(out / "checkpoint-10", out / "checkpoint-15")
    (out / "checkpoint-15" / "optimizer.pt").unlink()
    assert find_resume_checkpoint(str(out), "auto") == str(out / "checkpoint-10")
    assert vlm_main(["train", *args, "--max-steps", "20", "--resume", str(out / "checkpoint-15")]) == 1
    assert "checkpoint-15 is an incomplete checkpoint (no optimizer.pt)" in capsys.readouterr().err
    shutil.rmtree(out / "checkpoint-15")
    assert vlm_main(["train", *args, "--max-steps", "12", "--resume", str(out / "checkpoint-5")]) == 0
    assert "resuming from " + str(out / "checkpoint-5") in capsys.readouterr().out
    assert vlm_main(["train", *args, "--max-steps", "2", "--no-resume", "--save-steps", "100"]) == 0
    assert "resuming" not in capsys.readouterr().out
    assert vlm_main(["train", *args, "--resume", str(tmp_path)]) == 1
    assert "not a vlm training checkpoint" in capsys.readouterr().err


def test_two_processes_match_one_process(no_dropout_base, data_file, tmp_path):
    """accelerate launch, 2 CPU processes (gloo), batch 2 each == 1 process, batch 4."""
    common = ["--max-steps", "4", "--save-steps", "100", "data.num_workers=0", "lora.dropout=0.0"]
    single = tmp_path / "single"
    args = train_args(no_dropout_base, data_file, single, *common)
    assert vlm_main(["train", *args, "--batch-size", "4"]) == 0

    double = tmp_path / "double"
    cmd = accelerate_cpu(2, "train", *train_args(no_dropout_base, data_file, double, *common), "--batch-size", "2")
    env = subprocess_env()
    env["ACCELERATE_USE_CPU"] = "true"
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("recipe lora: training") == 1  # only the main process reports
    # Adam turns float noise in near-zero gradients (e.g. attention key biases, which softmax
    # ignores) into full-size steps, so allow 2e-4; each step moves weights by ~lr = 5e-3, so a
    # wrong split of the global batch or loss scaling shows up as ~1e-2.
    assert_same_weights(final_weights(double), final_weights(single), atol=2e-4)


def accelerate_cpu(nproc: int, *vlm_args: str) -> list[str]:
    """`accelerate launch` of `vlm ...` on `nproc` CPU processes (gloo; ACCELERATE_USE_CPU=true)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(nproc),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "vlm.cli", *vlm_args]


def test_ddp_with_text_only_rows_and_batch_one_finishes(base_dir, data_file, tmp_path):
    """LLaVA-style data: text-only rows between image rows. With batch 1 a process often holds a
    batch without an image, whose forward never reaches the Q-Former: DDP must not wait for its
    gradients (before the fix: no progress for 10 minutes)."""
    data = tmp_path / "mixed.jsonl"
    rows = [json.loads(line) for line in data_file.read_text().splitlines()]
    text = [{"messages": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": w}]} for w in WORDS]
    for row in rows:
        row["image"] = str(data_file.parent / row["image"])
    data.write_text("".join(json.dumps(r) + "\n" for pair in zip(rows, text) for r in pair))
    out = tmp_path / "out"
    args = train_args(base_dir, data, out, "--max-steps", "6", "--batch-size", "1", "data.num_workers=0")
    env = {**subprocess_env(), "ACCELERATE_USE_CPU": "true"}
    result = subprocess.run(accelerate_cpu(2, "train", *args), env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    from vlm import load_pretrained

    model, processor = load_pretrained(str(out), device="cpu")
    inputs = processor(images=[tiny.random_image(0)], text=["a photo of"])
    assert model.generate(**inputs, max_new_tokens=3).shape[1] > inputs["input_ids"].shape[1]


def kill_at(action, trap) -> None:
    """Run `action()` in a forked child that `trap()` has set up to SIGKILL itself at a known point."""
    pid = os.fork()
    if pid == 0:  # child: only file operations, then exit without running pytest's teardown
        trap()
        action()
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, "the trap never fired"


def die_on_call(module, name: str, call: int):
    """A trap: the `call`-th call of `module.name` kills the process before it runs."""
    def trap():
        real, seen = getattr(module, name), [0]

        def dying(*args, **kwargs):
            seen[0] += 1
            if seen[0] == call:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)

        setattr(module, name, dying)
    return trap


@pytest.mark.parametrize("trap", [die_on_call(os, "replace", 2), die_on_call(os, "unlink", 1000)],
                         ids=["between-the-renames", "deleting-the-old-folder"])
def test_checkpoint_saved_again_is_never_half_deleted(tmp_path, trap):
    """The same step saved twice, killed mid-swap (after the old folder moved aside, and half way
    through deleting it): `checkpoint-N` is the new one or absent, never partial."""
    files = 2000
    final, staged = tmp_path / "checkpoint-5", tmp_path / ".partial" / "checkpoint-5"
    final.mkdir()
    for i in range(files):
        (final / f"f{i}").write_text("old")
    staged.mkdir(parents=True)
    (staged / "trainable.safetensors").write_text("new")
    kill_at(lambda: replace_dir(str(staged), str(final)), trap)
    if final.exists():
        names = {p.name for p in final.iterdir()}
        assert names == {"trainable.safetensors"}, f"partial checkpoint: {len(names)} files"
    if staged.exists():  # killed before the swap: the next save does it
        replace_dir(str(staged), str(final))
    assert (final / "trainable.safetensors").read_text() == "new"


def test_auto_resume_refuses_checkpoints_of_another_run(base_dir, data_file, tmp_path, capsys):
    out = tmp_path / "out"
    args = train_args(base_dir, data_file, out, "--max-steps", "2", "--save-steps", "1", "data.num_workers=0")
    assert vlm_main(["train", *args]) == 0
    assert vlm_main(["train", *args, "lora.r=8"]) == 1  # another adapter: not that run continued
    err = capsys.readouterr().err
    assert f"{out} holds checkpoints of a run with another lora" in err and "--no-resume" in err
    assert vlm_main(["train", *args, "--max-steps", "3"]) == 0  # the same run, longer: continues
    assert "resuming from " + str(out / "checkpoint-2") in capsys.readouterr().out
    assert vlm_main(["train", *args, "lora.r=8", "--no-resume"]) == 0
