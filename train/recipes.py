"""Training recipes: which parts of the model train, and how.

- `stage1`: BLIP-2 stage 1 (`stage1.py`): queries, Q-Former, its text side and the ITC/ITM/ITG
  heads train on captions; the vision tower is frozen and no LLM is loaded. With
  `stage1.train_query_path: false`, only the text side and the heads train.
- `align`: the bridge alone, scored against the LLM's word embeddings on captions, no LLM layer
  run (`align.py`): a cheap first stage for a bridge that starts from scratch.
- `bridge`: BLIP-2 stage 2. Q-Former, query tokens and projection train; vision tower and LLM frozen.
- `lora`: peft LoRA on the LLM's attention and MLP projections (only inside `language_model`),
  plus the bridge unless `lora.train_bridge: false`.
- `qlora`: the same on an NF4 4-bit LLM (bitsandbytes; the vision tower stays in the compute
  dtype, the Q-Former in full precision).
- `full`: the parameters whose names start with one of `unfreeze` train.
"""

from __future__ import annotations

import os
import re

import torch
from torch import nn

from vlm import load_pretrained
from vlm.errors import VLMError
from vlm.files import BRIDGE_WEIGHTS
from vlm.image_text import IMAGE_TEXT_MODULES, TEXT_FFN, ImageTextModel, is_stage1_weight
from vlm.loading import default_dtype, is_peft, model_class, model_folder, read_vlm_config

from .config import BRIDGE_MODULES, TrainConfig

LLM_PREFIX = "language_model"
# What stage 1 trains: everything but the (frozen) vision tower.
STAGE1_MODULES = ("query_tokens", "qformer", *IMAGE_TEXT_MODULES)
PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(precision: str, cuda: bool) -> str:
    """`precision` with "auto" resolved: the compute dtype `vlm.loading.default_dtype` picks (bf16
    on GPUs with native bf16, fp16 on older ones), fp32 on CPU. fp16 needs a GPU."""
    if precision == "auto":
        precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(default_dtype("cuda" if cuda else "cpu"), "fp32")
    if precision == "fp16" and not cuda:
        raise VLMError("precision=fp16 needs a GPU; use bf16 or fp32 on CPU")
    return precision


def prepare_model(config: TrainConfig, device: str | None = None):
    """Load the model named by `config.model` and set it up for `config.recipe`.

    Frozen weights (vision tower, LLM) load in the compute dtype of `config.precision` (bf16 halves
    a frozen 7B LLM to 14 GB); the weights that train are kept in fp32, as peft and LLaVA keep them,
    and mixed precision (autocast) does the rest. Returns `(model, processor)`; the model is a
    `peft.PeftModel` for lora/qlora. The processor carries the training prompts (`config.prompt`),
    which are saved with the output.
    """
    quantization = "4bit" if config.recipe == "qlora" else None
    dtype = PRECISION_DTYPES[resolve_precision(config.precision, str(device or "").startswith("cuda"))]
    if config.recipe == "stage1":
        model, processor = load_image_text_model(config.model, device=device, dtype=dtype)
    else:
        model, processor = load_pretrained(config.model, quantization=quantization, device=device, dtype=dtype)
        if is_peft(model) and config.recipe not in ("lora", "qlora"):
            # A LoRA output (the demo is one) under another recipe: its adapter becomes part of
            # the LLM's weights, which that recipe keeps frozen or trains as a whole.
            model = model.merge_and_unload()
    apply_prompts(processor, config)
    model = apply_recipe(model, config)
    trainable_in_fp32(model)
    return model, processor


def trainable_in_fp32(model) -> None:
    """Master copies of the parameters that train in fp32 (optimizer updates lost in bf16's
    8-bit mantissa otherwise); frozen ones stay in the compute dtype."""
    for param in model.parameters():
        if param.requires_grad and param.dtype in (torch.float16, torch.bfloat16):
            param.data = param.data.float()


def load_image_text_model(name_or_path: str | None, device: str | None, dtype: torch.dtype):
    """The stage-1 model (no LLM) of a checkpoint: an official `Blip2ForImageTextRetrieval`, a stage-1
    output, or a `vlm` checkpoint with the stage-1 parts (`vlm build --qformer-init`), its LLM left unread."""
    from vlm.registry import DEFAULT_MODEL, resolve_model

    path = resolve_model(name_or_path or DEFAULT_MODEL)
    if os.path.isfile(os.path.join(path, BRIDGE_WEIGHTS)):
        raise VLMError(f"{path}: a LoRA output with a trained bridge; merge it first "
                       f"(vlm export {path} --merge-lora --output-dir DIR) and start the stage1 recipe from DIR")
    path = model_folder(path)  # an adapter folder: its base (the LLM's adapter plays no part in stage 1)
    config, _ = read_vlm_config(path)
    if model_class(config) is ImageTextModel:
        return load_pretrained(path, device=device, dtype=dtype)
    if not config.has_image_text_heads:
        raise VLMError(f"{path}: has no Q-Former text side or ITC/ITM/ITG heads for the stage1 recipe; build it with "
                       "`vlm build --qformer-init BERT_CHECKPOINT` or start from a Blip2ForImageTextRetrieval checkpoint")
    from vlm.processing import VLMProcessor

    model = ImageTextModel.from_pretrained(path, config=config, dtype=dtype).to(device or "cpu")
    return model, VLMProcessor.from_pretrained(path)


def apply_prompts(processor, config: TrainConfig) -> None:
    """Set the processor's caption prompt / question template from the config (validated)."""
    if config.prompt.caption_prompt is not None:
        processor.caption_prompt = config.prompt.caption_prompt
    template = config.prompt.question_template
    if template is not None:
        if template.count("{}") != 1:
            raise VLMError(f"prompt.question_template must hold exactly one {{}} for the question, got {template!r}")
        processor.question_template = template


def apply_recipe(model, config: TrainConfig):
    """Freeze/unfreeze (and wrap with LoRA) per `config.recipe`; returns the model to train."""
    recipe = config.recipe
    model.requires_grad_(False)
    if recipe == "stage1":
        _unfreeze(model, STAGE1_MODULES, "stage1")
        if not config.stage1.train_word_embeddings:
            model.embeddings.word_embeddings.requires_grad_(False)
        if not config.stage1.train_query_path:
            _freeze_query_path(model)
        _freeze_unweighted_heads(model, config)
    elif recipe in ("align", "bridge"):
        _unfreeze(model, BRIDGE_MODULES, "bridge")
        _freeze_text_side(model)
    elif recipe == "full":
        if not config.unfreeze:
            raise VLMError("unfreeze: the full recipe needs at least one module prefix to train")
        _unfreeze(model, config.unfreeze, "unfreeze")
    elif recipe in ("lora", "qlora"):
        # QLoRA: no peft `prepare_model_for_kbit_training`: it would upcast every non-quantized
        # weight (the frozen vision tower included) to fp32. The LoRA weights are fp32 (peft's
        # autocast_adapter_dtype), the 4-bit layers compute in the compute dtype.
        model = continue_lora(model, config) if is_peft(model) else wrap_lora(model, config)
        if config.lora.train_bridge:
            _unfreeze(model.get_base_model(), BRIDGE_MODULES, "bridge")
            _freeze_text_side(model.get_base_model())
    else:
        raise VLMError(f"recipe: unknown recipe {recipe!r} (expected stage1, align, bridge, lora, qlora or full)")
    if config.gradient_checkpointing:
        # Non-reentrant: works when the checkpointed block's inputs need no grad (frozen parts).
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if not any(p.requires_grad for p in model.parameters()):
        raise VLMError(f"recipe {recipe}: nothing to train (every parameter is frozen)")
    return model


# Every trainable parameter must get a gradient at every step: DDP (find_unused_parameters off)
# fails on the next step otherwise. So parts a recipe never runs stay frozen.
def _freeze_unweighted_heads(model, config: TrainConfig) -> None:
    """Stage 1 skips an objective of weight 0, so its head gets no gradient."""
    tied = model.embeddings.word_embeddings.weight  # ITG's decoder: the word embeddings, used by ITC/ITM too
    for objective, head in (("itm", model.itm_head), ("itg", model.itg_head)):
        if not getattr(config.stage1, objective):
            for param in head.parameters():
                if param is not tied:
                    param.requires_grad_(False)


def _freeze_query_path(model) -> None:
    """Freeze all that stage 2 runs (queries, the Q-Former's shared layers): only the text side and
    the heads (`is_stage1_weight`) stay trainable, so they fit the bridge as it is."""
    for name, param in model.named_parameters():
        if not is_stage1_weight(name):
            param.requires_grad_(False)


def _freeze_text_side(model) -> None:
    """Stage 2 feeds BLIP-2's Q-Former its queries only: the feed-forward layers of its text side
    (kept for stage 1's ITC/ITM/ITG) are not run. InstructBLIP's reads the instruction: they are."""
    if model.config.qformer_reads_instruction:
        return
    for name, param in model.named_parameters():
        if TEXT_FFN.match(name):
            param.requires_grad_(False)


def lora_target_pattern(model, target_modules: list[str] | str) -> str:
    """A peft `target_modules` regex matching only Linear layers inside the LLM.

    "auto" picks every Linear leaf in the LLM's decoder layers (attention and MLP projections;
    never the output head). Names that match nothing inside the LLM are a VLMError.
    """
    linear_names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if name.startswith(LLM_PREFIX + ".") and isinstance(module, nn.Linear) and _in_layer(name)
    }
    if target_modules == "auto":
        chosen = sorted(linear_names)
        if not chosen:
            raise VLMError("lora.target_modules=auto: the LLM has no Linear layers inside its decoder layers")
    else:
        chosen = list(target_modules)
        unknown = [t for t in chosen if t not in linear_names]
        if unknown:
            raise VLMError(
                f"lora.target_modules: {', '.join(unknown)} match no Linear layer of the LLM "
                f"(it has: {', '.join(sorted(linear_names)) or 'none'})"
            )
    return rf"{LLM_PREFIX}\..*\.(?:{'|'.join(re.escape(n) for n in chosen)})"


def wrap_lora(model, config: TrainConfig):
    """The model wrapped in a peft LoRA adapter on the LLM's projections."""
    from peft import LoraConfig, get_peft_model

    pattern = lora_target_pattern(model, config.lora.target_modules)
    lora_config = LoraConfig(
        r=config.lora.r,
        lora_alpha=config.lora.alpha,
        lora_dropout=config.lora.dropout,
        target_modules=pattern,
        bias="none",
    )
    return get_peft_model(model, lora_config)


def continue_lora(model, config: TrainConfig):
    """`config.model` is a LoRA output: its adapter (loaded onto its base) trains on as it is, so
    a second stage can refine the first one's adapter (`lora.r` and `lora.alpha` must match it)."""
    adapter = model.peft_config[model.active_adapter]
    for key, have in (("r", adapter.r), ("alpha", adapter.lora_alpha)):
        if getattr(config.lora, key) != have:
            raise VLMError(f"lora.{key}: {getattr(config.lora, key)}, but the adapter of {config.model} has "
                           f"{key} {have} (a LoRA output's adapter trains on as it is; set lora.{key}: {have})")
    adapter.inference_mode = False
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.requires_grad_(True)
    return model


def trainable_parameter_count(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def _in_layer(name: str) -> bool:
    # Decoder blocks live under `.layers.N.` (Llama, Mistral, OPT) or `.h.N.` (GPT-2 style).
    return re.search(r"\.(?:layers|h|blocks)\.\d+\.", name) is not None


def _unfreeze(model, prefixes, key: str) -> None:
    matched = set()
    for name, param in model.named_parameters():
        for prefix in prefixes:
            if name == prefix or name.startswith(prefix + "."):
                if param.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
                    param.requires_grad_(True)
                matched.add(prefix)
    missing = [p for p in prefixes if p not in matched]
    if missing:
        raise VLMError(f"{key}: {', '.join(missing)} name no parameters of the model")
