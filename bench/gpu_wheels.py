"""Prepare `.whl/`: the wheels `bench/gpu.py` needs on the lent GPU machine, within its 64 MiB carry.

That machine (Python 3.12, torch cu130, transformers 5.17, no internet) lacks bitsandbytes and
pydantic and has an older transformers than ours. bitsandbytes' wheel (43 MB) holds a library for
every CUDA and ROCm version; the copy made here keeps only the CUDA 13.0 one (4 MB) and rewrites
the wheel's RECORD to match, so pip installs it as usual.

    python bench/gpu_wheels.py            # writes .whl/ (git-ignored) in the repository root

Then, in one device `run` with `carry=[".whl"]` (see bench/RESULTS.md for the exact command):

    python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site .whl/*.whl . \\
      && PYTHONPATH=/tmp/site python3 bench/gpu.py --out $OUT/gpu.md
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ["bitsandbytes==0.50.2", "transformers==5.24.0", "pydantic==2.14.4", "pydantic-core==2.50.5",
          "annotated-types==0.8.0", "typing-inspection==0.4.5"]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64"]
KEEP_LIBRARY = "libbitsandbytes_cuda130.so"  # the device's torch is built for CUDA 13.0


def download(folder: Path) -> None:
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(folder), *WHEELS],
                   check=True)


def slim_bitsandbytes(wheel: Path) -> Path:
    """Rewrite `wheel` without the native libraries the device does not use (RECORD updated)."""
    def dropped(name: str) -> bool:
        return name.startswith("bitsandbytes/libbitsandbytes_") and not name.endswith((KEEP_LIBRARY, "_cpu.so"))

    slim = wheel.with_suffix(".slim")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as dst:
        record_name = next(n for n in src.namelist() if n.endswith(".dist-info/RECORD"))
        for name in src.namelist():
            if name != record_name and not dropped(name):
                dst.writestr(src.getinfo(name), src.read(name))
        lines = [line for line in src.read(record_name).decode().splitlines() if not dropped(line.split(",")[0])]
        dst.writestr(record_name, "\n".join(lines) + "\n")
    slim.replace(wheel)
    return wheel


def main() -> int:
    folder = ROOT / ".whl"
    folder.mkdir(exist_ok=True)
    download(folder)
    (wheel,) = folder.glob("bitsandbytes-*.whl")
    slim_bitsandbytes(wheel)
    total = sum(p.stat().st_size for p in folder.glob("*.whl"))
    for path in sorted(folder.glob("*.whl")):
        print(f"{path.stat().st_size / 2**20:6.1f} MB  {path.name}")
    print(f"{total / 2**20:6.1f} MB in all (the device carries at most 64 MiB with the working tree)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
