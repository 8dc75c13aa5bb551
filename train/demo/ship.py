"""Copy a demo training run's weights into `vlm/demo_weights/` (fp16), for a release.

    python -m vlm.train.demo.ship RUN_DIR --command "vlm train ..." [--eval EVAL.json ...] [--stage1 DIR]

RUN_DIR is the output folder of the demo's last LoRA stage, `vlm train demo-easyvqa-compare` (a LoRA
+ bridge run on the demo model).
Writes `bridge.safetensors` (with the stage-1 heads of `--stage1 DIR`, a heads-only stage1 run on
the merged RUN_DIR, or else of the run's base) and the LoRA adapter cast to fp16, the novelty
statistics, and `demo.json` with the processor prompts the run trained with, the command, and the eval summaries
(`vlm eval` JSON) given. The next `vlm build --demo` (or first use) rebuilds the demo with them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vlm.demo.pipeline import DEMO_META, WEIGHTS_DIR
from vlm.errors import VLMError
from vlm.files import ADAPTER_CONFIG, ADAPTER_WEIGHTS, BRIDGE_WEIGHTS
from vlm.image_text import is_stage1_weight
from vlm.novelty import NOVELTY_FILE

PROCESSOR_KEYS = ("question_template", "caption_prompt")
# The LoRA on every projection (r 16) is 9.4 MB fp16, the Q-Former with its text side 39 MB.
MAX_BYTES = 50 * 1024 * 1024
# Every file `ship` manages in the weights folder (its README.md is written by hand).
SHIPPED = (BRIDGE_WEIGHTS, NOVELTY_FILE, ADAPTER_CONFIG, ADAPTER_WEIGHTS, DEMO_META)


def _fp16_copy(src: Path, dst: Path) -> None:
    tensors = {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in load_file(src).items()}
    save_file(tensors, dst, metadata={"format": "pt"})


def stage1_parts(run: Path, heads: Path | None = None) -> dict[str, torch.Tensor]:
    """The stage-1 weights (heads and the Q-Former's text-side feed-forward layers, which stage 2
    does not train, so they are not in the run's bridge) of `heads`, a `stage1` run with
    `stage1.train_query_path: false` on the run's merged output; without it, of the run's base
    when it has them (the demo build has them untrained). The word embeddings (and the ITG decoder
    tied to them) are left out: the demo's stage 1 keeps MiniLM's, which the build has already."""
    if heads is not None:
        if not (heads / "model.safetensors").is_file():
            raise VLMError(f"--stage1 {heads}: no model.safetensors (not the output folder of a finished stage1 run)")
        state = load_file(heads / "model.safetensors")
        _check_fitted_to(run, heads, state)
    else:
        config = json.loads((run / ADAPTER_CONFIG).read_text()) if (run / ADAPTER_CONFIG).is_file() else {}
        base = Path(config.get("base_model_name_or_path") or "")
        if not (base / "model.safetensors").is_file():
            return {}
        state = load_file(base / "model.safetensors")
    skip = ("embeddings.word_embeddings.weight", "itg_head.decoder.weight")
    return {k: v for k, v in state.items() if is_stage1_weight(k) and k not in skip}


def _check_fitted_to(run: Path, heads: Path, state: dict[str, torch.Tensor]) -> None:
    """Heads fitted to another bridge would score nothing: the bridge parts in `heads` must be the run's."""
    bridge = load_file(run / BRIDGE_WEIGHTS) if (run / BRIDGE_WEIGHTS).is_file() else {}
    for key in ("query_tokens", "language_projection.weight"):
        if key in bridge and not (key in state and torch.allclose(bridge[key].float(), state[key].float(), atol=1e-6)):
            raise VLMError(f"--stage1 {heads}: its {key} is not {run}'s; fit the heads on `vlm export {run} "
                           "--merge-lora` (configs/train/demo-easyvqa-heads.yaml)")


def ship(run: Path, command: str, evals: list[dict], weights: Path = WEIGHTS_DIR,
         max_bytes: int = MAX_BYTES, heads: Path | None = None) -> list[Path]:
    """Write the run's trained weights (fp16) and demo.json into `weights`; returns the files written.

    The files are written next to `weights` first and checked against the size budget; only then
    do they replace the old ones (a file an older run shipped and this one lacks is removed), so a
    failure leaves the shipped demo as it was."""
    if not (run / BRIDGE_WEIGHTS).is_file():
        raise VLMError(f"{run}: no {BRIDGE_WEIGHTS} (not the output folder of a finished bridge/LoRA run)")
    staging = Path(tempfile.mkdtemp(prefix=".ship-", dir=weights))
    try:
        names = _write(run, command, evals, staging, heads)
        total = sum((staging / name).stat().st_size for name in names)
        if total > max_bytes:
            raise VLMError(f"the shipped demo weights would be {total / 2**20:.1f} MB, over the "
                           f"{max_bytes / 2**20:.0f} MB budget; nothing was changed")
        for name in SHIPPED:
            if name not in names:
                (weights / name).unlink(missing_ok=True)
        for name in names:  # demo.json last: it says which run the files are from
            os.replace(staging / name, weights / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [weights / name for name in names]


def _write(run: Path, command: str, evals: list[dict], out: Path, heads: Path | None) -> list[str]:
    """The shipped files of `run`, written into `out`; their names, demo.json last."""
    bridge = load_file(run / BRIDGE_WEIGHTS)
    bridge.update(stage1_parts(run, heads))
    save_file({k: v.to(torch.float16) if v.is_floating_point() else v for k, v in bridge.items()},
              out / BRIDGE_WEIGHTS, metadata={"format": "pt"})
    names = [BRIDGE_WEIGHTS]
    if (run / NOVELTY_FILE).is_file():  # the training images' statistics: novelty warnings
        shutil.copyfile(run / NOVELTY_FILE, out / NOVELTY_FILE)
        names.append(NOVELTY_FILE)
    if (run / ADAPTER_CONFIG).is_file():
        adapter_config = json.loads((run / ADAPTER_CONFIG).read_text())
        # The run's base is a folder on the training machine; the demo's base is the demo build.
        adapter_config["base_model_name_or_path"] = "vlm-demo"
        (out / ADAPTER_CONFIG).write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")
        _fp16_copy(run / ADAPTER_WEIGHTS, out / ADAPTER_WEIGHTS)
        names += [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    processor_config = json.loads((run / "processor_config.json").read_text())
    meta = {
        "processor": {k: processor_config[k] for k in PROCESSOR_KEYS if processor_config.get(k) is not None},
        "command": command,
        "eval": evals,
    }
    (out / DEMO_META).write_text(json.dumps(meta, indent=2) + "\n")
    return names + [DEMO_META]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vlm.train.demo.ship", description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="output folder of the demo training run")
    p.add_argument("--command", required=True, help="the exact command that trained it (recorded in demo.json)")
    p.add_argument("--eval", action="append", default=[], type=Path, help="a `vlm eval` JSON summary to record")
    p.add_argument("--stage1", type=Path, default=None, metavar="DIR",
                   help="take the ITC/ITM/ITG heads and the Q-Former's text side from DIR, a stage1 run "
                        "(stage1.train_query_path=false) on the run's merged output (default: from the run's base)")
    args = p.parse_args(argv)
    try:
        evals = [json.loads(path.read_text()) for path in args.eval]
        for path in ship(args.run, args.command, evals, heads=args.stage1):
            print(f"{path} ({path.stat().st_size / 2**20:.1f} MB)")
    except VLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
