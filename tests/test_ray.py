"""`vlm caption --ray` / `vlm score --ray` and `vlm.serve.ray_data`: the same rows as one machine.

Every Ray run here is a real `vlm` process starting a local Ray instance (2 CPUs, 2 actors); the
one-machine reference runs in this process. Rows are compared as the bytes of their JSON lines.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import tiny
from caption_files import make_awkward_folder
from vlm.cli import main as vlm_main
from vlm.serve.ray_shards import iter_output, settle, shard_paths, write_shard

ROOT = Path(__file__).resolve().parent.parent
CAPTION = ["--max-new-tokens", "6", "--batch-size", "8", "--no-progress"]
TEXTS = ["a red circle", "a photo of a cat"]


def cli_env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("WORLD_SIZE", None)
    return env


def vlm(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vlm.cli", *args], env=cli_env(), capture_output=True, text=True,
                          timeout=timeout)


def lines_of(path: Path) -> list[str]:
    """The JSON lines of an output file, or of every JSONL shard of a folder, sorted."""
    files = [path] if path.is_file() else sorted(path.glob("part-*.jsonl"))
    return sorted(line for f in files for line in f.read_text(encoding="utf-8").splitlines())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """200 image files: 185 small random PNGs and the 15 awkward ones (4 of which cannot be read)."""
    root = tmp_path_factory.mktemp("corpus")
    make_awkward_folder(root / "awkward")
    for i in range(185):
        tiny.random_image(i, (20 + i % 7 * 5, 18 + i % 4 * 6)).save(root / f"img{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def one_machine(corpus, blip2_opt_dir, tmp_path_factory) -> list[str]:
    out = tmp_path_factory.mktemp("one") / "captions.jsonl"
    assert vlm_main(["caption", str(corpus), "--out", str(out), "--model", str(blip2_opt_dir), *CAPTION,
                     "--num-workers", "0"]) == 0
    lines = lines_of(out)
    assert len(lines) == 200 and sum('"error"' in line for line in lines) == 4
    return lines


# -- fast: flags, the missing extra, exactly-once bookkeeping (no Ray instance) ------------------------
def test_without_the_extra_ray_is_a_one_line_error(tmp_path):
    tiny.random_image(0).save(tmp_path / "a.png")
    for command in (["caption"], ["score", "--text", "a cat"]):
        code = ("import sys; sys.modules['ray'] = None  # as if vlm[ray] were not installed\n"
                "from vlm.cli import main\n"
                f"sys.exit(main({[*command, str(tmp_path / 'a.png'), '--out', str(tmp_path / 'out'), '--ray']!r}))")
        result = subprocess.run([sys.executable, "-c", code], env=cli_env(), capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 1
        assert result.stderr.strip() == "error: --ray needs Ray Data, an optional extra: pip install 'vlm[ray]'"
    assert not (tmp_path / "out").exists()


def test_importing_vlm_and_its_batch_commands_loads_no_ray():
    code = "import sys, vlm, vlm.cli, vlm.serve.caption, vlm.serve.score, vlm.serve.ray_cli; print('ray' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], env=cli_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_ray_flags(tmp_path, capsys):
    tiny.random_image(0).save(tmp_path / "a.png")
    for argv, message in [
        ([str(tmp_path / "a.png"), "--out", "o", "--shard-size", "5"], "--shard-size needs --ray"),
        (["--ray", str(tmp_path / "a.png"), "--out", "o"], "is not a Ray address"),
        ([str(tmp_path / "a.png"), "--ray", "--format", "csv", "--out", "o"], "not --format csv"),
        ([str(tmp_path / "a.png"), "--ray"], "--out is required with --ray"),
    ]:
        with pytest.raises(SystemExit) as e:
            vlm_main(["caption", *argv])
        assert e.value.code == 2
        assert message in capsys.readouterr().err


def test_settle_keeps_the_first_copy_of_a_row(tmp_path):
    """A row in two shards (a worker outliving its driver) is kept once; the shard is rewritten whole."""
    a = [{"image": "a.png", "caption": "x"}, {"image": "b.png", "caption": "y"}]
    b = [{"image": "b.png", "caption": "y"}, {"image": "c.png", "error": "c.png: empty file"}]
    write_shard(str(tmp_path), "part-a", a, "jsonl", [])
    write_shard(str(tmp_path), "part-b", b, "parquet", ["image", "caption", "error"])
    write_shard(str(tmp_path), "part-c", b[:1], "jsonl", [])  # nothing but a duplicate: removed
    done, removed = settle(str(tmp_path), ["image", "caption", "error"])
    assert removed == 2 and len(done) == 3
    assert [Path(p).name for p in shard_paths(str(tmp_path))] == ["part-a.jsonl", "part-b.parquet"]
    assert sorted(r["image"] for r in iter_output(str(tmp_path))) == ["a.png", "b.png", "c.png"]
    assert list(iter_output(str(tmp_path)))[2] == {"image": "c.png", "error": "c.png: empty file"}
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


# -- slow: real Ray runs ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_caption_on_ray_same_rows_as_one_machine_then_resumes(corpus, one_machine, blip2_opt_dir, tmp_path):
    shards = tmp_path / "shards"
    args = ["caption", str(corpus), "--out", str(shards), "--model", str(blip2_opt_dir), *CAPTION,
            "--shard-size", "20", "--ray"]
    result = vlm(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert lines_of(shards) == one_machine  # byte for byte, error rows included
    assert len(list(shards.glob("part-*.jsonl"))) == 10
    assert "captioned 196, errors 4, skipped 0 (already done)" in result.stderr
    again = vlm(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "captioned 0, errors 0, skipped 200" in again.stderr
    assert lines_of(shards) == one_machine


@pytest.mark.slow
def test_score_on_ray_same_rows_as_one_machine(retrieval_dir, blip2_opt_dir, tmp_path, one_torch_thread):
    """Byte-identical with the same batches and threads as the actors' (a chunk is one batch here).
    Other batchings move a score by float rounding: about 1 in 50 differ in the 6th decimal."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(30):
        tiny.random_image(i).save(folder / f"{i:02d}.png")
    (folder / "broken.png").write_text("not an image")
    listing = tmp_path / "pairs.jsonl"  # per-row texts, and a row that takes the --text ones
    listing.write_text("".join(json.dumps(r) + "\n" for r in [
        {"image": "imgs/00.png", "text": "a blue square"}, {"image": "imgs/broken.png", "text": "a dog"},
        {"image": "imgs/01.png"}]))
    common = [str(folder), str(listing), "--model", str(retrieval_dir), "--no-progress",
              *[a for t in TEXTS for a in ("--text", t)]]
    one = tmp_path / "one.jsonl"
    assert vlm_main(["score", *common, "--out", str(one), "--num-workers", "0", "--batch-size", "9"]) == 0
    result = vlm("score", *common, "--out", str(tmp_path / "shards"), "--batch-size", "9", "--shard-size", "9",
                 "--ray")
    assert result.returncode == 0, result.stderr[-3000:]
    assert lines_of(tmp_path / "shards") == lines_of(one)
    assert len(lines_of(one)) == 31 * 2 + 2  # 01.png with the --text texts repeats two folder pairs
    assert "scored 61, errors 3, skipped 2" in result.stderr
    # A model without the stage-1 heads fails in every actor's __init__: one line, exit 1.
    bad = vlm("score", str(folder), "--text", "a cat", "--out", str(tmp_path / "bad"), "--model",
              str(blip2_opt_dir), "--no-progress", "--ray")
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines()[-1] == (
        f"error: the actors could not start: {blip2_opt_dir}: has no image-text (ITC/ITM) heads; score with a "
        "Blip2ForImageTextRetrieval checkpoint or a `vlm train --recipe stage1` output")


@pytest.fixture(scope="module")
def retrieval_dir(tmp_path_factory) -> Path:
    return tiny.save_official_retrieval(tmp_path_factory.mktemp("retrieval"), seed=7)


def start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "vlm.cli", *args], env=cli_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def wait_for_shards(proc: subprocess.Popen, folder: Path, n: int, timeout: float = 300) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if len(list(folder.glob("part-*.jsonl"))) >= n:
            return len(list(folder.glob("part-*.jsonl")))
        time.sleep(0.1)
    raise AssertionError(f"no {n} shards before the run ended: {proc.poll()} {proc.stderr.read()[-3000:]}")


def ray_workers(proc: subprocess.Popen, actor: str, want: int = 2, timeout: float = 60) -> list:
    """The run's actor processes (up to `want`, waiting for a slow second start): Ray names each
    after its class, `ray::MapWorker(MapBatches(...))`."""
    import psutil

    deadline = time.time() + timeout
    while True:
        found = [p for p in psutil.Process(proc.pid).children(recursive=True) if actor in " ".join(p.cmdline()[:1])]
        if len(found) >= want or time.time() > deadline:
            return found
        time.sleep(0.2)


@pytest.mark.slow
def test_a_killed_worker_has_its_chunk_redone_every_image_once(corpus, one_machine, blip2_opt_dir, tmp_path):
    shards = tmp_path / "shards"
    proc = start(["caption", str(corpus), "--out", str(shards), "--model", str(blip2_opt_dir), *CAPTION,
                  "--batch-size", "2", "--shard-size", "4", "--ray"])
    try:
        wait_for_shards(proc, shards, 3)
        workers = ray_workers(proc, "ShardCaptioner")
        assert workers
        workers[0].kill()  # SIGKILL: whatever chunk it held is lost mid-way
        landed = len(list(shards.glob("part-*.jsonl")))
        _, stderr = proc.communicate(timeout=600)
    finally:
        proc.kill()
    assert landed < 50  # it died mid-run
    assert proc.returncode == 0, stderr[-3000:]
    assert lines_of(shards) == one_machine  # every image exactly once, the same rows
    assert "captioned 196, errors 4, skipped 0" in stderr


@pytest.mark.slow
def test_interrupted_driver_then_rerun_every_image_once(corpus, one_machine, blip2_opt_dir, tmp_path):
    import psutil

    shards = tmp_path / "shards"
    args = ["caption", str(corpus), "--out", str(shards), "--model", str(blip2_opt_dir), *CAPTION,
            "--batch-size", "2", "--shard-size", "4", "--ray"]
    proc = start(args)
    try:
        wait_for_shards(proc, shards, 3)
        ray_processes = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr[-3000:]
    assert "interrupted" in stderr
    _, alive = psutil.wait_procs(ray_processes, timeout=60)
    assert not alive, alive  # the local Ray instance went with its driver
    written = len(lines_of(shards))
    assert 0 < written < 200
    result = vlm(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"skipped {written} (already done)" in result.stderr
    assert lines_of(shards) == one_machine


@pytest.mark.slow
def test_parquet_in_and_out(corpus, blip2_opt_dir, tmp_path):
    """A Parquet list (relative paths, per-row prompts) gives the rows of the same list as JSONL."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    names = sorted(p.name for p in corpus.glob("img00*.png"))[:8] + ["awkward/zero-byte.jpg"]
    rows = [{"image": f"corpus/{n}", "prompt": "a photo of" if i % 2 else None} for i, n in enumerate(names)]
    (tmp_path / "corpus").symlink_to(corpus)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "list.parquet")
    (tmp_path / "list.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if v}) + "\n" for r in rows))
    one = tmp_path / "one.jsonl"
    assert vlm_main(["caption", str(tmp_path / "list.jsonl"), "--out", str(one), "--model", str(blip2_opt_dir),
                     *CAPTION, "--num-workers", "0"]) == 0
    result = vlm("caption", str(tmp_path / "list.parquet"), "--out", str(tmp_path / "shards"), "--model",
                 str(blip2_opt_dir), *CAPTION, "--shard-size", "3", "--shard-format", "parquet", "--ray")
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(list((tmp_path / "shards").glob("part-*.parquet"))) == 3
    key = lambda r: r["image"]  # noqa: E731
    assert sorted(iter_output(str(tmp_path / "shards")), key=key) == sorted(
        (json.loads(line) for line in one.read_text().splitlines()), key=key)


@pytest.mark.slow
def test_python_api_map_batches(corpus, one_machine, blip2_opt_dir, retrieval_dir):
    """Captioner / Scorer in Dataset.map_batches: bytes, paths and URIs give the CLI's rows.
    (A column holds one type: Arrow turns a column mixing str and bytes into bytes.)"""
    import ray

    from vlm.serve.ray_data import Captioner, Scorer

    path = str(corpus / "img000.png")
    data = Path(path).read_bytes()
    want = next(json.loads(line) for line in one_machine if json.loads(line)["image"] == path)
    named = [{"image": path, "id": 0}, {"image": Path(path).as_uri(), "id": 1},
             {"image": path, "question": "what is it?", "id": 2}]
    blobs = [{"image": data, "id": 3}, {"image": b"junk", "id": 4}]
    captioner = dict(fn_constructor_kwargs={"model": str(blip2_opt_dir), "max_new_tokens": 6, "batch_size": 4},
                     concurrency=1, batch_size=8)
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        out = [r for rows in (named, blobs) for r in ray.data.from_items(rows).map_batches(Captioner, **captioner)
               .take_all()]
        scores = ray.data.from_items([{"image": path}, {"image": Path(path).as_uri(), "text": "a dog"}]).map_batches(
            Scorer, fn_constructor_kwargs={"model": str(retrieval_dir), "texts": TEXTS}, concurrency=1,
            batch_size=8).take_all()
    finally:
        ray.shutdown()
    out.sort(key=lambda r: r["id"])
    assert [r["caption"] for r in out[:2]] + [out[3]["caption"]] == [want["caption"]] * 3
    assert [r["image"] for r in out[:3]] == [path, Path(path).as_uri(), path]
    assert out[3]["image"].startswith("sha256:") and out[3]["error"] is None
    assert out[4]["error"].startswith(out[4]["image"] + ": ") and out[4]["caption"] is None
    assert out[2]["question"] == "what is it?" and isinstance(out[2]["answer"], str) and out[2]["caption"] is None
    assert [(r["text"], type(r["itc"])) for r in scores] == [(TEXTS[0], float), (TEXTS[1], float), ("a dog", float)]


def test_a_ctrl_c_that_something_swallows_still_interrupts_the_run():
    """A real SIGINT whose KeyboardInterrupt is caught and dropped (as code inside Ray can) is
    raised again when the run's block ends; the handler before it is back afterwards."""
    from vlm.serve.ray_run import sticky_interrupt

    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        with sticky_interrupt() as interrupted:
            try:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(1)
            except KeyboardInterrupt:
                pass  # swallowed
            assert interrupted.is_set()
    assert signal.getsignal(signal.SIGINT) is before
    with sticky_interrupt() as interrupted:  # no Ctrl-C: nothing raised
        pass
    assert not interrupted.is_set()
