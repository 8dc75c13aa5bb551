"""Bad input gives one clear line naming the thing, and a non-zero exit from the CLI."""

import json
import shutil
import subprocess
import sys

import pytest

import tiny
from vlm import VLMError, load_pretrained
from vlm.images import load_image


def test_missing_folder():
    with pytest.raises(VLMError, match=r"\./no/such/model: no such folder"):
        load_pretrained("./no/such/model")


def test_unreachable_hub_id_with_nothing_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(VLMError, match="Salesforce/blip2-not-there: not a local folder, and the hub could not be reached"):
        load_pretrained("Salesforce/blip2-not-there")


def test_unsupported_architecture(tmp_path):
    tiny.save_llm_part(tmp_path, "llama")
    with pytest.raises(VLMError, match=r"unsupported architecture 'llama'"):
        load_pretrained(tmp_path)


def test_folder_without_config(tmp_path):
    with pytest.raises(VLMError, match="has no config.json"):
        load_pretrained(tmp_path)


def test_config_with_wrong_type(tiny_vlm_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_vlm_dir, bad)
    config = json.loads((bad / "config.json").read_text())
    config["num_query_tokens"] = "four"
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(VLMError, match=r"bad config.json: .*num_query_tokens must be an integer, got 'four'"):
        load_pretrained(bad)


def test_config_with_unsupported_sub_config(tiny_vlm_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_vlm_dir, bad)
    config = json.loads((bad / "config.json").read_text())
    config["vision_config"]["model_type"] = "vit"
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(VLMError, match=r"vision_config.model_type='vit' is not supported"):
        load_pretrained(bad)


@pytest.mark.parametrize(
    "content, message",
    [(b"", "empty file"), (b"this is not a png", "not an image"), (None, "no such file")],
)
def test_undecodable_images(tmp_path, content, message):
    path = tmp_path / "photo.png"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(VLMError, match=message) as info:
        load_image(path)
    assert str(path) in str(info.value)


def test_truncated_image(tmp_path):
    path = tmp_path / "cut.png"
    tiny.random_image(0, (64, 64)).save(path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(VLMError, match="cut.png: cannot decode image"):
        load_image(path)


def test_cli_one_line_error_and_debug_traceback():
    cmd = [sys.executable, "-m", "vlm.cli", "build", "--vision", "./nope", "--llm", "./nope", "--output-dir", "x"]
    plain = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert plain.returncode == 1
    assert plain.stderr.strip().startswith("error: --vision ./nope")
    assert "Traceback" not in plain.stderr
    debug = subprocess.run(cmd + ["--debug"], capture_output=True, text=True, timeout=120)
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_cli_unknown_command_and_help():
    r = subprocess.run([sys.executable, "-m", "vlm.cli", "fly"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "unknown command 'fly'" in r.stderr
    r = subprocess.run([sys.executable, "-m", "vlm.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "caption" in r.stdout and "build" in r.stdout


def test_stderr_holds_only_our_lines(blip2_opt_dir, tmp_path):
    """A real `vlm caption`: besides the weights' load bar, only its summary (bitsandbytes' note on
    kernels it could not load, printed on AVX512-BF16 CPUs such as these, and FutureWarnings stay out)."""
    tiny.random_image(0).save(tmp_path / "a.png")
    result = subprocess.run([sys.executable, "-m", "vlm.cli", "caption", str(tmp_path / "a.png"), "--out",
                             str(tmp_path / "o.jsonl"), "--model", str(blip2_opt_dir), "--max-new-tokens", "2",
                             "--num-workers", "0", "--no-progress"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip() and "Loading weights" not in line]
    assert len(lines) == 1 and lines[0].startswith("captioned 1, errors 0"), result.stderr


def test_library_warnings_are_quiet_unless_verbose(capsys):
    import logging
    import warnings

    from vlm.cli import QUIET_LOGGERS, quiet_libraries

    levels = {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")
            quiet_libraries()
            warnings.warn("a library deprecation", FutureWarning)
            logging.getLogger("bitsandbytes.backends.cpu.ops").warning("a kernel it could not load")
            warnings.warn("a library's note", UserWarning)  # attributed to a module outside vlm
            warnings.warn_explicit("our own", UserWarning, "engine.py", 1, module="vlm.engine.engine")
        assert [str(w.message) for w in caught] == ["our own"]
        assert "a kernel it could not load" not in capsys.readouterr().err
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


@pytest.mark.parametrize("command, abbreviation", [("serve", "--adapter-for"), ("chat", "--adapter-for"),
                                                   ("caption", "--quant"), ("score", "--quant")])
def test_flags_are_not_abbreviated(command, abbreviation, tmp_path):
    result = subprocess.run([sys.executable, "-m", "vlm.cli", command, *(["x.png", "--out", "o.jsonl"]
                             if command in ("caption", "score") else []), abbreviation, "x"],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 2 and f"unrecognized arguments: {abbreviation}" in result.stderr, result.stderr
