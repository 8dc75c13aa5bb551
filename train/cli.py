"""`vlm train CONFIG [dotted.key=value ...] [--flags]`: fine-tune a vision-language model.

CONFIG is a YAML file or the name of a shipped preset (`lora`, `qlora`, ...). Multi-process /
multi-GPU runs go through accelerate, with a shipped accelerate config::

    accelerate launch --config_file "$(vlm train --accelerate-config ddp)" -m vlm.cli train lora ...
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from vlm.errors import VLMError

from .config import TrainConfig, load_config
from .recipes import BUILTIN, recipe_names

EPILOG = """\
examples:
  vlm train lora data.train=captions.jsonl output_dir=runs/lora     # the shipped `lora` preset
  vlm train my-recipe.yaml data.train=captions.jsonl
  vlm train --recipe bridge --model ./my-vlm --train-data coco/captions_train2017.json \\
            --image-root coco/train2017 --max-steps 2000 --batch-size 16
  vlm train qlora lora.r=8 prompt.question_template="Question: {} Answer:"
  vlm train --print-config lora lora.r=4        # the resolved configuration, as YAML; trains nothing
  vlm train lora training_args.optim=adafactor  # any transformers TrainingArguments field

presets (CONFIG by name; `vlm train --list-presets` prints them with their files):
  {presets}

several GPUs or CPU processes (accelerate configs ddp, fsdp, deepspeed-zero2 ship with vlm;
`vlm train --accelerate-config NAME` prints the file's path):
  accelerate launch --config_file "$(vlm train --accelerate-config ddp)" -m vlm.cli train lora ...

recipes:
  stage1  BLIP-2 stage 1 on captions, no LLM loaded: queries, Q-Former and its text side learn
          image-text contrast (ITC), matching (ITM) and captioning (ITG); stage 2 starts from its output
  align   the bridge alone, on captions: the soft prompt learns to hold the caption's words (read
          through the LLM's embeddings, no LLM layer runs); a fast first stage for a new bridge
  bridge  Q-Former, queries and projection train; vision tower and LLM frozen (BLIP-2 stage 2)
  lora    LoRA on the LLM's attention+MLP projections, plus the bridge (lora.train_bridge)
  qlora   the same on a 4-bit (NF4) LLM; needs bitsandbytes
  full    train the parameters named by `unfreeze` (name prefixes)
{more_recipes}
Order of precedence: flags > dotted overrides > CONFIG > defaults. A run whose output
folder holds checkpoints continues from the newest one (resume=auto); --no-resume starts over.
The output folder loads with vlm.load_pretrained(OUTPUT_DIR) and `vlm caption --model OUTPUT_DIR`.
"""

# flag -> dotted config key
FLAG_KEYS = {
    "recipe": "recipe",
    "model": "model",
    "train_data": "data.train",
    "eval_data": "data.eval",
    "image_root": "data.image_root",
    "task": "data.task",
    "output_dir": "output_dir",
    "max_steps": "max_steps",
    "epochs": "epochs",
    "learning_rate": "learning_rate",
    "batch_size": "batch_size",
    "grad_accum": "grad_accum",
    "precision": "precision",
    "seed": "seed",
    "save_steps": "save_steps",
}


def build_parser() -> argparse.ArgumentParser:
    from vlm.configs import TRAIN_DIR, names

    p = argparse.ArgumentParser(
        prog="vlm train",
        description="Fine-tune a BLIP-2-style model on captions, VQA or conversations.",
        epilog=EPILOG.replace("{presets}", ", ".join(names(TRAIN_DIR))).replace("{more_recipes}", more_recipes()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # an unknown flag is an error, never a guessed prefix
    )
    p.add_argument("args", nargs="*", metavar="CONFIG | key=value",
                   help="a YAML file or a preset name (e.g. lora) and/or dotted overrides such as lora.r=8")
    p.add_argument("--recipe", help=f"what trains: {', '.join(recipe_names())} (see below)")
    p.add_argument("--model", help="base model: vlm/BLIP-2/InstructBLIP folder or hub id (default: the demo model)")
    p.add_argument("--train-data", help="COCO/Karpathy/VQAv2/LLaVA JSON, JSONL/CSV, HF dataset or imagefolder")
    p.add_argument("--eval-data", help="held-out data for periodic eval loss")
    p.add_argument("--image-root", help="folder that relative image paths are resolved against")
    p.add_argument("--task", choices=["caption", "vqa", "chat"], help="default: detected from the data")
    p.add_argument("--output-dir", help="checkpoints and the final model go here")
    p.add_argument("--max-steps", type=int, help="optimizer steps (overrides --epochs)")
    p.add_argument("--epochs", type=float)
    p.add_argument("--learning-rate", "--lr", type=float)
    p.add_argument("--batch-size", type=int, help="per process")
    p.add_argument("--grad-accum", type=int, help="gradient accumulation steps")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--seed", type=int)
    p.add_argument("--save-steps", type=int, help="checkpoint every N steps")
    resume = p.add_mutually_exclusive_group()
    resume.add_argument("--resume", nargs="?", const="auto", metavar="CHECKPOINT",
                        help="resume from CHECKPOINT, or (no value) from the newest one in --output-dir")
    resume.add_argument("--no-resume", action="store_true", help="start fresh even if checkpoints exist")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    p.add_argument("--list-presets", action="store_true", help="print the shipped presets and their files, and exit")
    p.add_argument("--accelerate-config", metavar="NAME",
                   help="print the path of a shipped accelerate config (ddp, fsdp, deepspeed-zero2) and exit")
    return p


def more_recipes() -> str:
    """The help's line for recipes registered beyond vlm's own (installed packages' entry points)."""
    others = [name for name in recipe_names() if name not in BUILTIN]
    if not others:
        return "  (packages add recipes through the entry point group vlm.recipes: see vlm.train.recipes)\n"
    return f"  {', '.join(others)}: registered by installed packages (entry point group vlm.recipes)\n"


def parse_config(argv: list[str]) -> tuple[TrainConfig, argparse.Namespace]:
    """The resolved `TrainConfig` for a command line."""
    args = build_parser().parse_intermixed_args(argv)
    config_path = None
    overrides = []
    for item in args.args:
        if "=" in item:
            overrides.append(item)
        elif config_path is None:
            config_path = item
        else:
            raise VLMError(f"{item}: only one CONFIG may be given (overrides look like key=value)")
    for flag, key in FLAG_KEYS.items():
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={json.dumps(value)}")
    if args.resume is not None:
        overrides.append(f"resume={json.dumps(args.resume)}")
    if args.no_resume:
        overrides.append("resume=none")
    return load_config(config_path, overrides), args


def print_shipped(args: argparse.Namespace) -> int:
    """`--list-presets` / `--accelerate-config NAME`: where the shipped files are."""
    from vlm.configs import ACCELERATE_DIR, TRAIN_DIR, accelerate_config, names

    if args.accelerate_config:
        print(accelerate_config(args.accelerate_config))
        return 0
    for title, folder in (("training presets", TRAIN_DIR), ("accelerate configs", ACCELERATE_DIR)):
        print(f"{title}:")
        for name in names(folder):
            print(f"  {name:<22} {folder / (name + '.yaml')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of `vlm train`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--list-presets" in argv or "--accelerate-config" in argv or any(
            a.startswith("--accelerate-config=") for a in argv):
        return print_shipped(build_parser().parse_intermixed_args(argv))
    config, args = parse_config(argv)
    if args.print_config:
        import yaml

        print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
        return 0
    from .run import train  # checks the data (none given is an error) before the model loads

    out = train(config)
    if out is not None:
        print(f"saved the trained model to {out}")
    return 0


if __name__ == "__main__":
    # `python -m vlm.train.cli` / `accelerate launch -m vlm.train.cli`: same error handling as `vlm train`.
    from vlm.cli import main as vlm_main

    logging.basicConfig(level=logging.WARNING)
    sys.exit(vlm_main(["train", *sys.argv[1:]]))
