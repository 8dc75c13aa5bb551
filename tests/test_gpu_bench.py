"""`bench/gpu.py --smoke`: the prepared GPU check runs end to end at tiny shapes on CPU, so it cannot rot."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_bench_smoke_runs_and_writes_its_table(tmp_path):
    out = tmp_path / "gpu.md"
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--smoke", "--out", str(out)],
                            capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    table = out.read_text()
    assert "### smoke (tiny shapes) run" in table and "| bf16 |" in table
    assert "| batch 2 |" in table and "| batch 4 |" in table and "| lora | 2 |" in table
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return
    assert "| 4-bit NF4 |" in table and "| qlora | 2 |" in table
