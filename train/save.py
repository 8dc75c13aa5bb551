"""The training output folder, which `vlm.load_pretrained(output_dir)` opens as the fine-tuned model.

- LoRA/QLoRA: the peft adapter (`adapter_config.json`, `adapter_model.safetensors`, base
  recorded as `base_model_name_or_path`) plus `bridge.safetensors` (Q-Former, queries,
  projection) when the bridge trained.
- bridge/full: a complete `vlm` checkpoint (`config.json`, `model.safetensors`).
- always: the processor, with the prompt template used in training, and `train_config.yaml`.

Checkpoints for resuming are different and smaller: `trainable.safetensors` holds the
parameters that train, next to the Trainer's optimizer/scheduler/RNG state.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.distributed.tensor import DTensor

from vlm.errors import VLMError
from vlm.files import ADAPTER_CONFIG, BRIDGE_WEIGHTS
from vlm.loading import is_peft

from .config import BRIDGE_MODULES, TrainConfig, save_config

TRAINABLE_WEIGHTS = "trainable.safetensors"
PEFT_PREFIX = "base_model.model."  # a peft model's state-dict names, before the base model's
TRAIN_CONFIG = "train_config.yaml"
# Half-written checkpoints and output files; cleared when a run starts.
STAGING_DIR = ".partial"
# What makes `load_pretrained` take a folder for a LoRA adapter / a vlm checkpoint.
MODEL_MARKERS = (ADAPTER_CONFIG, "config.json")
# The names of the files `vlm train` has written into an output folder (so it replaces only those).
OUTPUT_MANIFEST = ".vlm-output.json"
# Names a run writes at the top of its output folder: one the user already has there would be replaced.
OUTPUT_NAME = re.compile(r".*\.(safetensors|json|jinja|model|txt)|train_config\.yaml|qformer_tokenizer|merges\.txt")


def written_by_vlm(out: str | os.PathLike) -> set[str]:
    """Top-level names in `out` that `vlm train` wrote (its manifest; empty for a new folder)."""
    out = Path(out)
    try:
        return set(json.loads((out / OUTPUT_MANIFEST).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    if (out / TRAIN_CONFIG).is_file():  # an output written before the manifest existed
        return {p.name for p in out.iterdir() if OUTPUT_NAME.fullmatch(p.name)}
    return set()


def record_written(out: str | os.PathLike, names) -> None:
    """Add `names` to `out`'s manifest of files `vlm train` wrote."""
    path = Path(out) / OUTPUT_MANIFEST
    path.write_text(json.dumps({"files": sorted(written_by_vlm(out) | set(names))}, indent=1))


def check_output_dir(out: str | os.PathLike) -> set[str]:
    """The user's own entries in `out` (those `vlm train` did not write), checked before training:
    a `VLMError` when one has a name the run writes (a `config.json`, weights...), since `vlm train`
    never replaces a file it did not write. A README.md there stays the user's (the run leaves its
    model card out). Give the result to `record_run_files` at the end."""
    out = Path(out)
    if not out.is_dir():
        return set()
    ours = written_by_vlm(out) | {OUTPUT_MANIFEST}
    theirs = {p.name for p in out.iterdir() if p.name not in ours}
    clashes = sorted(name for name in theirs if OUTPUT_NAME.fullmatch(name))
    if clashes:
        raise VLMError(f"output_dir {out} holds {', '.join(clashes[:3])}{' ...' if len(clashes) > 3 else ''}, "
                       "which vlm train did not write and would replace; choose another (or an empty) output_dir")
    return theirs


def record_run_files(out: str | os.PathLike, theirs: set[str]) -> None:
    """Record every top-level entry of `out` but the user's own (`theirs`) as written by the run
    (the Trainer's metrics and the novelty statistics land there too)."""
    record_written(out, {p.name for p in Path(out).iterdir()} - theirs - {OUTPUT_MANIFEST})


def write_train_config(config: TrainConfig, out: str | os.PathLike) -> None:
    """`train_config.yaml` into `out` (recorded as written by the run)."""
    save_config(config, Path(out) / TRAIN_CONFIG)
    record_written(out, [TRAIN_CONFIG])


def base_model(model):
    """The bare `VisionLanguageModel` under a peft wrapper (or `model` itself)."""
    return model.get_base_model() if is_peft(model) else model


def trainable_state(model, state_dict: dict | None = None) -> dict[str, torch.Tensor]:
    """The parameters that train, by name, as contiguous CPU tensors."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    source = state_dict if state_dict is not None else dict(model.named_parameters())
    return {n: source[n].detach().to("cpu").contiguous() for n in names if n in source}


def save_trainable(model, directory: str | os.PathLike, state_dict: dict | None = None) -> None:
    """Write `trainable.safetensors` (the resumable weights) into `directory`."""
    os.makedirs(directory, exist_ok=True)
    save_file(trainable_state(model, state_dict), os.path.join(directory, TRAINABLE_WEIGHTS), metadata={"format": "pt"})


def load_trainable(model, directory: str | os.PathLike) -> None:
    """Load `trainable.safetensors` from a checkpoint into `model`; names must all match."""
    path = os.path.join(directory, TRAINABLE_WEIGHTS)
    if not os.path.isfile(path):
        raise VLMError(f"{directory}: not a vlm training checkpoint (no {TRAINABLE_WEIGHTS})")
    state = load_file(path)
    params = dict(model.named_parameters())
    unknown = sorted(set(state) - set(params))
    if unknown:
        raise VLMError(f"{path}: holds weights this model does not have ({unknown[0]}...); was the recipe changed?")
    missing = sorted(n for n, p in params.items() if p.requires_grad and n not in state)
    if missing:
        raise VLMError(f"{path}: lacks trained weights ({missing[0]}...); was the recipe changed?")
    if any(isinstance(p, DTensor) for p in params.values()):
        # FSDP2: each process keeps its shard of the full tensors the checkpoint holds.
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))
        return
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))


def bridge_state(model, state_dict: dict | None = None) -> dict[str, torch.Tensor]:
    """Q-Former, query tokens and projection of a (peft-wrapped or plain) model, base names.

    `state_dict`: the model's gathered state (FSDP/DeepSpeed hold only shards in the model)."""
    if state_dict is None:
        state_dict = base_model(model).state_dict()
    elif is_peft(model):
        state_dict = {k.removeprefix(PEFT_PREFIX): v for k, v in state_dict.items()}
    return {
        name: tensor.detach().to("cpu").contiguous()
        for name, tensor in state_dict.items()
        if name.split(".", 1)[0] in BRIDGE_MODULES
    }


def save_trained(model, processor, output_dir: str | os.PathLike, config: TrainConfig,
                 state_dict: dict | None = None) -> Path:
    """Write the loadable output folder (see module doc); returns its path.

    The folder also holds the run's checkpoints, so it cannot be swapped whole: the files are
    written into `output_dir/.partial/output` and then moved in one by one, the files that make
    `load_pretrained` treat the folder as a model (`adapter_config.json`, `config.json`) last.
    A kill at any point leaves either the previous complete output, or a folder without those
    files (an error when loaded), never a half-written model that loads (e.g. an untrained bridge).
    `state_dict`: the full weights gathered from every process (FSDP/DeepSpeed), else the model's.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    staging = out / STAGING_DIR / "output"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        model.save_pretrained(staging, state_dict=state_dict)
        if is_peft(model):
            if config.lora.train_bridge:
                save_file(bridge_state(model, state_dict), staging / BRIDGE_WEIGHTS, metadata={"format": "pt"})
            _absolute_base_path(staging)
        processor.save_pretrained(staging)
        save_config(config, staging / TRAIN_CONFIG)
        _move_into(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        drop_if_empty(staging.parent)
    return out


def save_stage1(model, processor, config: TrainConfig, state_dict: dict | None = None) -> Path:
    """The output of a `stage1` run: a checkpoint that also carries the base's LLM, when it had one.

    Stage 1 never loads the LLM; stage 2 (`bridge`, `lora`) needs it, and starts from this folder.
    So for a `vlm` base the full model is loaded now, the stage-1 weights put in, and saved whole; a
    base without an LLM (an official retrieval checkpoint) gives a stage-1 model again.
    """
    from vlm.image_text import ImageTextModel
    from vlm.loading import load_pretrained, model_class, model_folder, read_vlm_config
    from vlm.registry import DEFAULT_MODEL, resolve_model

    base_path = model_folder(resolve_model(config.model or DEFAULT_MODEL))
    base_config, _ = read_vlm_config(base_path)
    trained = state_dict if state_dict is not None else model.state_dict()
    if model_class(base_config) is not ImageTextModel:
        # In fp32, so that the trained parts keep their precision (a bf16 load would round them).
        full, _ = load_pretrained(base_path, device="cpu", dtype=torch.float32)
        known = full.state_dict()
        full.load_state_dict({k: v.to(known[k].dtype) for k, v in trained.items() if k in known}, strict=False)
        model, trained = full, None
    return save_trained(model, processor, config.output_dir, config, trained)


def _move_into(staging: Path, out: Path) -> None:
    """Move every entry of `staging` into `out`, the files that mark a loadable folder last. A file
    of the user's is never replaced (`check_output_dir` refused the names that matter before
    training; what is left is a README.md, which stays theirs and our model card is dropped)."""
    ours = written_by_vlm(out)
    for marker in MODEL_MARKERS:  # the old output stops loading before its files are replaced
        if marker in ours:
            (out / marker).unlink(missing_ok=True)
    entries = sorted(staging.iterdir(), key=lambda p: (p.name in MODEL_MARKERS, p.name))
    moved = [entry.name for entry in entries if entry.name in ours or not (out / entry.name).exists()]
    record_written(out, moved)  # first: a kill part way leaves files the next run may replace
    for entry in entries:
        if entry.name not in moved:
            print(f"kept your {out / entry.name} (vlm train did not write it)", file=sys.stderr)
        elif entry.is_dir():
            replace_dir(str(entry), str(out / entry.name))
        else:
            os.replace(entry, out / entry.name)


def drop_if_empty(folder: str | os.PathLike) -> None:
    """Remove `folder` when nothing is left in it (the staging folder after a complete save)."""
    with contextlib.suppress(OSError):
        os.rmdir(folder)


def replace_dir(new: str, final: str) -> None:
    """Move folder `new` to `final`, replacing any folder there, so that `final` is never partial.

    The old folder is first renamed aside (atomic), not deleted in place: a kill during a
    recursive delete would leave a half-deleted `final` that still looks complete. A kill
    between the two renames leaves no `final`; the aside copy sits next to `new` (in a staging
    folder, which the next run clears).
    """
    old = None
    if os.path.isdir(final):
        old = os.path.join(os.path.dirname(new), f"old-{os.path.basename(final)}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(new, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _absolute_base_path(out: Path) -> None:
    """Record the base as an absolute path when it is a local folder, so the output moves freely."""
    import json

    path = out / ADAPTER_CONFIG
    data = json.loads(path.read_text())
    base = data.get("base_model_name_or_path")
    if base and os.path.isdir(base):
        data["base_model_name_or_path"] = os.path.abspath(base)
        path.write_text(json.dumps(data, indent=2, sort_keys=True))
