"""The shipped presets, installed as `vlm.configs`: training recipes and accelerate configs.

    vlm train lora ...                      # a preset by name (configs/train/lora.yaml)
    accelerate launch --config_file "$(vlm train --accelerate-config ddp)" -m vlm.cli train lora ...
"""

from __future__ import annotations

from pathlib import Path

from vlm.errors import VLMError

HERE = Path(__file__).resolve().parent
TRAIN_DIR = HERE / "train"
ACCELERATE_DIR = HERE / "accelerate"


def names(folder: Path) -> list[str]:
    """The preset names in `folder` (file stems), sorted."""
    return sorted(p.stem for p in folder.glob("*.yaml"))


def _find(folder: Path, name: str, what: str) -> Path:
    path = folder / f"{name}.yaml"
    if not path.is_file():
        raise VLMError(f"{name}: no such {what} (shipped: {', '.join(names(folder))})")
    return path


def accelerate_config(name: str) -> Path:
    """The YAML file of a shipped accelerate config: `ddp`, `fsdp`, `deepspeed-zero2`."""
    return _find(ACCELERATE_DIR, name, "accelerate config")
