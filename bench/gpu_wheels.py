"""Prepare `.whl/`: the wheels `bench/gpu.py` needs on the lent GPU machine, within its 64 MiB carry.

That machine (Python 3.12, torch 2.11 cu130, transformers 5.17, huggingface_hub 1.33, no internet)
lacks bitsandbytes and pydantic, has a transformers older than `vlm` needs (5.17 has no
`SubConfigSpec`) and a peft and typing_extensions of unknown version. The working tree travels
too (about 52 MB with the demo weights), so the wheels get what is left of 64 MiB, and three are
cut down here, their RECORD rewritten so pip installs them as usual:

- bitsandbytes (43 MB): only its CUDA 13.0 library (the device's torch is built for 13.0) and the CPU one;
- transformers 5.24 (13.5 MB; 5.25 would need huggingface_hub 2.4): only the model families
  `vlm` and the benchmarks use (`KEEP_MODELS`);
- the project, built from the last commit: without `vlm/demo_weights/` (the benchmark never
  loads the demo; the checkout it runs from has them anyway).

    python bench/gpu_wheels.py            # writes .whl/ (git-ignored) in the repository root

The one command that installs them and runs the benchmark on the device is in bench/RESULTS.md
("How to run it"); this script reads it from there and prints it, so the two cannot disagree.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "RESULTS.md"
CARRY_LIMIT = 64 * 2**20  # the device tool's limit on the working tree and carried paths together
WHEELS = ["bitsandbytes==0.50.2", "transformers==5.24.0", "peft==0.21.2", "typing_extensions==4.16.0",
          "pydantic==2.14.4", "pydantic-core==2.50.5", "annotated-types==0.8.0", "typing-inspection==0.4.5"]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64"]
KEEP_LIBRARY = "libbitsandbytes_cuda130.so"  # the device's torch is built for CUDA 13.0
# transformers' model families imported by a `bench/gpu.py --smoke` run on the full 5.24 wheel
# (auto, bert, blip, blip_2, bloom and encoder_decoder through peft, instructblip, llama, opt), plus
# those the project's own modules name (bit, dinov2, gpt2: the demo's image processor, vision tower
# and OPT's tokenizer class). Checked by running the smoke with these wheels and huggingface_hub 1.33
# installed to a target folder, the project not installed (as on the device): every row ok.
KEEP_MODELS = {"auto", "bert", "bit", "blip", "blip_2", "bloom", "dinov2", "encoder_decoder", "gpt2", "instructblip",
               "llama", "opt"}


def install_command() -> str:
    """The device command in bench/RESULTS.md: the one ```bash block under "How to run it"."""
    text = RESULTS.read_text()
    section = text.split("## How to run it", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    if len(blocks) != 1:
        raise SystemExit(f"{RESULTS}: expected one ```bash block under 'How to run it', found {len(blocks)}")
    return blocks[0].strip()


def download(folder: Path) -> None:
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(folder), *WHEELS],
                   check=True)


def slim(wheel: Path, dropped: Callable[[str], bool]) -> Path:
    """Rewrite `wheel` without the files `dropped` names (its RECORD updated to match)."""
    out = wheel.with_suffix(".slim")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        record_name = next(n for n in src.namelist() if n.endswith(".dist-info/RECORD"))
        for name in src.namelist():
            if name != record_name and not dropped(name):
                dst.writestr(src.getinfo(name), src.read(name))
        lines = [line for line in src.read(record_name).decode().splitlines() if not dropped(line.split(",")[0])]
        dst.writestr(record_name, "\n".join(lines) + "\n")
    out.replace(wheel)
    return wheel


def unused_bitsandbytes_library(name: str) -> bool:
    return name.startswith("bitsandbytes/libbitsandbytes_") and not name.endswith((KEEP_LIBRARY, "_cpu.so"))


def unused_transformers_model(name: str) -> bool:
    parts = name.split("/")
    return len(parts) > 3 and parts[:2] == ["transformers", "models"] and parts[2] not in KEEP_MODELS


def demo_weights(name: str) -> bool:
    return name.startswith("vlm/demo_weights/")


def build_project(folder: Path) -> Path:
    """The project's wheel, built from the last commit (not from files others are editing)."""
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", "HEAD"], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                                "-w", str(folder), tmp], capture_output=True, text=True)  # setuptools is chatty
        if built.returncode != 0:
            raise SystemExit(f"building the project's wheel failed:\n{built.stdout}{built.stderr}")
    (wheel,) = folder.glob("vlm-*.whl")
    return slim(wheel, demo_weights)


def tree_bytes() -> int:
    """Bytes of what the device tool sends besides carried paths: tracked and untracked-not-ignored files."""
    names = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "-co", "--exclude-standard"], check=True,
                           capture_output=True).stdout.decode().split("\0")
    return sum((ROOT / n).stat().st_size for n in names if n and (ROOT / n).is_file())


def main() -> int:
    """Write `.whl/`, print its wheels and sizes, and fail when it and the tree exceed the carry limit."""
    folder = ROOT / ".whl"
    folder.mkdir(exist_ok=True)
    for old in folder.glob("*.whl"):
        old.unlink()
    download(folder)
    slim(next(folder.glob("bitsandbytes-*.whl")), unused_bitsandbytes_library)
    slim(next(folder.glob("transformers-*.whl")), unused_transformers_model)
    build_project(folder)
    wheels = sum(p.stat().st_size for p in folder.glob("*.whl"))
    for path in sorted(folder.glob("*.whl")):
        print(f"{path.stat().st_size / 2**20:6.1f} MiB  {path.name}")
    tree = tree_bytes()
    print(f"{wheels / 2**20:6.1f} MiB of wheels + {tree / 2**20:.1f} MiB working tree = "
          f"{(wheels + tree) / 2**20:.1f} MiB of the device's {CARRY_LIMIT / 2**20:.0f} MiB carry")
    print(f"\nthen one device run with carry=['.whl'] and timeout_s=600:\n\n{install_command()}\n")
    if wheels + tree > CARRY_LIMIT:
        print("error: over the carry limit: the device tool would refuse the call", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
