"""`bench/gpu.py --smoke`: the prepared GPU check runs end to end at tiny shapes on CPU, so it cannot rot.

One run with a benchmark made to fail on purpose checks what the GPU run relies on: a row for every
benchmark (figures, or its error), the failure recorded without ending the run, the models of every
benchmark freed as soon as it returns (no garbage collector needed), and a valid `--out` throughout."""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FAILS = "generate-bf16"  # fails after loading its model: the model must still be freed


def planned() -> list:
    """The benchmarks `bench/gpu.py --smoke` runs (its own list: a new one is checked too)."""
    if "gpu_bench" not in sys.modules:
        spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "bench" / "gpu.py")
        sys.modules["gpu_bench"] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    bench = sys.modules["gpu_bench"]
    return bench.plan(bench.SHAPES["smoke"])


def run_smoke(tmp_path: Path, *flags: str, fail: str = "") -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / "gpu.md"
    env = {**os.environ, "VLM_BENCH_FAIL": fail}
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--smoke", "--out", str(out), *flags],
                            capture_output=True, text=True, timeout=180, cwd=tmp_path, env=env)
    return result, out


def tables(markdown: str) -> list[list[list[str]]]:
    """Every table as rows of cells; asserts each is well formed (a separator, equal cell counts)."""
    found, current = [], []
    for line in markdown.splitlines() + [""]:
        if line.startswith("|"):
            assert line.endswith("|"), line
            current.append([c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]])
        elif current:
            assert len(current) >= 2 and all(re.fullmatch(r"-{3,}", c) for c in current[1]), current[:2]
            assert {len(row) for row in current} == {len(current[0])}, current
            found.append(current)
            current = []
    return found


def rows_by_label(markdown: str) -> dict[str, dict[str, str]]:
    return {row[0]: dict(zip(table[0], row)) for table in tables(markdown) for row in table[2:]}


def test_smoke_run_records_every_benchmark_survives_a_failure_and_frees_each_model(tmp_path):
    result, out = run_smoke(tmp_path, fail=FAILS)
    assert result.returncode == 1, result.stderr[-3000:]  # a benchmark failed: the exit status says so
    markdown = out.read_text()
    assert markdown.startswith("### smoke (tiny shapes) run") and "4-bit on cpu:" in markdown
    rows = rows_by_label(markdown)
    four_bit_ok = "4-bit on cpu: ok" in markdown
    for bench in planned():
        row = rows[bench.label]
        if bench.id == FAILS:
            assert row["status"] == f"error: RuntimeError: {FAILS} failed on purpose (VLM_BENCH_FAIL)", row
        elif bench.four_bit and not four_bit_ok:
            assert row["status"].startswith("skipped: 4-bit does not work here"), row
            continue
        else:
            assert row["status"] == "ok", row
        # Its models died with it (the failed one's too): the next benchmark gets the memory back.
        assert row["model freed at del"] == "yes", row
    assert rows["batch 2"]["status"] == "ok" and rows["lora"]["samples/step (batch x grad_accum)"] == "4 (2 x 2)"


def test_time_budget_skips_what_would_start_late(tmp_path):
    result, out = run_smoke(tmp_path, "--budget-s", "0")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = rows_by_label(out.read_text())
    assert len(rows) == len(planned())
    assert all(r["status"].startswith("skipped: the 0 s budget was spent") for r in rows.values()), rows


def test_one_install_command_for_the_device():
    """bench/RESULTS.md holds the device command; bench/gpu_wheels.py reads it there and holds no copy."""
    spec = importlib.util.spec_from_file_location("gpu_wheels", ROOT / "bench" / "gpu_wheels.py")
    wheels = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(wheels)
    command = wheels.install_command()
    assert "--target /tmp/site .whl/*.whl &&" in command and "PYTHONPATH=/tmp/site" in command
    assert "python3 bench/gpu.py --out $OUT/gpu.md" in command
    assert len(command) <= 2000  # what the device tool's `run` accepts
    assert "--target" not in (ROOT / "bench" / "gpu_wheels.py").read_text()  # no second copy to drift
