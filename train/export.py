"""`vlm export DIR --merge-lora --output-dir OUT [--format vlm|blip2]`: one standalone checkpoint.

`--format vlm` (default) writes a `vlm` folder (LoRA merged into the LLM, trained bridge
included, processor with its prompts). `--format blip2` writes an official
`Blip2ForConditionalGeneration` folder that plain transformers loads unchanged; it needs a
BLIP-2 vision tower and a Q-Former that reads no instruction (weights map 1:1).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vlm.errors import VLMError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vlm export",
        allow_abbrev=False,  # an unknown flag is an error, never a guessed prefix
        description="Write a trained model (e.g. a LoRA output folder of `vlm train`) as one standalone checkpoint.",
        epilog="example: vlm export runs/lora --merge-lora --output-dir my-model\n"
        "         vlm export runs/lora --merge-lora --format blip2 --output-dir my-blip2",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", metavar="DIR", help="a vlm checkpoint, a LoRA output folder or an official BLIP-2 folder")
    p.add_argument("--output-dir", required=True, help="where the standalone checkpoint goes (must be empty or new)")
    p.add_argument("--merge-lora", action="store_true", help="merge the LoRA adapter into the LLM weights")
    p.add_argument("--format", choices=["vlm", "blip2"], default="vlm",
                   help="vlm: our format (default); blip2: an official Blip2ForConditionalGeneration folder")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="dtype of the written weights (the Q-Former stays fp32)")
    return p


def export(model_dir: str, output_dir: str, merge_lora: bool = False, fmt: str = "vlm", dtype: str = "float32") -> Path:
    """Load `model_dir`, merge LoRA if asked, write `output_dir`; returns its path."""
    from vlm import load_pretrained
    from vlm.loading import is_peft

    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise VLMError(f"--output-dir {output_dir}: is a file, not a folder")
    if out.exists() and any(out.iterdir()):
        raise VLMError(f"--output-dir {output_dir}: folder is not empty")
    if out.resolve() == Path(model_dir).resolve():
        raise VLMError("--output-dir must differ from the model folder")
    model, processor = load_pretrained(model_dir, device="cpu", dtype=dtype)
    if is_peft(model):
        if not merge_lora:
            raise VLMError(f"{model_dir} holds a LoRA adapter: pass --merge-lora to fold it into the LLM")
        model = model.merge_and_unload()
    if fmt == "blip2":
        write_blip2(model, processor, out)
    else:
        model.save_pretrained(out)
        processor.save_pretrained(out)
    return out


def write_blip2(model, processor, out: Path) -> None:
    """Write `model` as an official `Blip2ForConditionalGeneration` folder (+ `Blip2Processor`)."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor

    config = model.config
    if config.vision_config.model_type != "blip_2_vision_model":
        raise VLMError(
            f"--format blip2 needs a BLIP-2 vision tower; this model's is {config.vision_config.model_type!r} "
            "(use --format vlm)"
        )
    if config.qformer_reads_instruction:
        raise VLMError("--format blip2: this model's Q-Former reads the instruction (InstructBLIP); use --format vlm")
    blip2_config = Blip2Config(
        vision_config=config.vision_config.to_dict(),
        qformer_config=config.qformer_config.to_dict(),
        text_config=config.text_config.to_dict(),
        num_query_tokens=config.num_query_tokens,
        image_token_index=config.image_token_index,
    )
    blip2 = Blip2ForConditionalGeneration(blip2_config).to(model.dtype)
    state = model.state_dict()
    missing, unexpected = blip2.load_state_dict(state, strict=False)
    # Tied output embeddings may be absent from one side's state dict; anything else is a mismatch.
    missing = [k for k in missing if not k.endswith("lm_head.weight") or config.text_config.tie_word_embeddings is False]
    if missing or unexpected:
        raise VLMError(f"--format blip2: weights do not map onto BLIP-2 (missing {missing[:3]}, unexpected {unexpected[:3]})")
    blip2.generation_config = model.generation_config
    blip2.save_pretrained(out)
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    Blip2Processor(processor.image_processor, tokenizer, num_query_tokens=config.num_query_tokens).save_pretrained(out)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `vlm export`."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    out = export(args.model, args.output_dir, args.merge_lora, args.format, args.dtype)
    print(f"wrote {args.format} checkpoint to {out}")
    return 0
