"""`Recipe`: what a training recipe decides, and the defaults most recipes share.

A run calls its recipe in this order (`vlm.train.run.train`):

1. `check_data(train, eval, processes)`: refuse data or process counts it cannot train on, before
   anything loads;
2. `prepare_model(device)`: load the model (`load`) in the compute dtype, set the training prompts,
   choose what trains (`select_trainable`: freezing, LoRA wrapping), keep those weights in fp32;
3. `datasets(processor, train, eval, processes)`: datasets and the collator;
4. `compute_loss(trainer, model, inputs, ...)`: each step's loss (default: the LLM's next-token loss);
5. `save(model, processor, state_dict)`: the output folder `vlm.load_pretrained` opens.

A subclass sets `name` (and `summary`, one line for listings) and overrides what differs.
`defaults` are config values the recipe needs unless the config sets them (a YAML preset or a
`key=value` override wins); they are what `vlm train --print-config` shows.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch

from vlm import load_pretrained
from vlm.errors import VLMError
from vlm.loading import default_dtype, is_peft

from ..collate import TrainDataset, make_collator
from ..config import TrainConfig
from ..save import save_trained

PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
logger = logging.getLogger(__name__)


class Recipe:
    """One way of training a model: the base loads `config.model` whole and trains it on the LLM's
    next-token loss; `select_trainable` (what trains) is each recipe's own."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    # Config keys (nested as in YAML) this recipe sets when the config does not.
    defaults: ClassVar[dict[str, Any]] = {}
    # `vlm.load_pretrained`'s quantization of the LLM ("4bit", "8bit") or None.
    quantization: ClassVar[str | None] = None
    # transformers' `Trainer.loss_is_scaled_for_ga`: False for a per-batch mean loss (Trainer then
    # divides it across accumulation steps); None for the LLM's loss, scaled by its token count.
    loss_is_scaled_for_ga: ClassVar[bool | None] = None

    def __init__(self, config: TrainConfig):
        self.config = config
        self.processor = None  # set by prepare_model

    # -- data ------------------------------------------------------------------------------------
    def check_data(self, train_examples: Sequence, eval_examples: Sequence | None, processes: int) -> None:
        """Raise a VLMError for data (or a number of processes) this recipe cannot train on."""

    def datasets(self, processor, train_examples: Sequence, eval_examples: Sequence | None, processes: int = 1):
        """(train dataset, eval dataset or None, collator): prompts rendered as inference renders them."""
        max_length = self.config.data.max_length
        evaluation = TrainDataset(eval_examples, processor, max_length) if eval_examples else None
        return TrainDataset(train_examples, processor, max_length), evaluation, make_collator(processor)

    # -- model -----------------------------------------------------------------------------------
    def prepare_model(self, device: str | None = None):
        """Load `config.model` and set it up for training; returns `(model, processor)`.

        Frozen weights (vision tower, LLM) load in the compute dtype of `config.precision` (bf16 halves
        a frozen 7B LLM to 14 GB); the weights that train are kept in fp32, as peft and LLaVA keep them,
        and mixed precision (autocast) does the rest. The processor carries the training prompts
        (`config.prompt`), which are saved with the output.
        """
        dtype = PRECISION_DTYPES[resolve_precision(self.config.precision, str(device or "").startswith("cuda"))]
        model, processor = self.load(device, dtype)
        apply_prompts(processor, self.config)
        model.requires_grad_(False)
        model = self.select_trainable(model)
        if self.config.gradient_checkpointing:
            # Non-reentrant: works when the checkpointed block's inputs need no grad (frozen parts).
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        if not any(p.requires_grad for p in model.parameters()):
            raise VLMError(f"recipe {self.name}: nothing to train (every parameter is frozen)")
        draw_untrained_queries(model)
        trainable_in_fp32(model)
        self.processor = processor
        return model, processor

    def load(self, device: str | None, dtype: torch.dtype):
        """`(model, processor)` of `config.model`. A LoRA output (the demo is one) is merged: its
        adapter becomes part of the LLM's weights, which the recipe keeps frozen or trains as a whole."""
        model, processor = load_pretrained(self.config.model, quantization=self.quantization, device=device,
                                           dtype=dtype)
        return (model.merge_and_unload() if is_peft(model) else model), processor

    def select_trainable(self, model):
        """Unfreeze (or wrap) what trains in `model`, whose parameters all arrive frozen; returns the
        model to train."""
        raise NotImplementedError(f"recipe {self.name} does not say what trains (select_trainable)")

    # -- loss ------------------------------------------------------------------------------------
    def compute_loss(self, trainer, model, inputs: dict, return_outputs: bool = False, num_items_in_batch=None):
        """The step's loss, as `Trainer.compute_loss` returns it. `model` is the (DDP-)wrapped model: a
        loss computed through a bare one would skip DDP's gradient all-reduce. `trainer.log_loss_parts`
        adds named parts to the training log."""
        return trainer.language_model_loss(model, inputs, return_outputs, num_items_in_batch)

    # -- output ----------------------------------------------------------------------------------
    def save(self, model, processor, state_dict: dict | None = None) -> Path:
        """Write the output folder (`vlm.train.save`); `state_dict` holds the gathered weights under
        FSDP / DeepSpeed (None otherwise)."""
        return save_trained(model, processor, self.config.output_dir, self.config, state_dict)


def check_image_captions(examples: Sequence, recipe: str) -> None:
    """A VLMError naming the first row that is not a caption of an image."""
    for example in examples:
        if example.task != "caption" or example.image is None:
            what = "has no image" if example.image is None else f"is a {example.task} row"
            raise VLMError(f"{example.source or 'data'}: {what}; the {recipe} recipe trains on image captions only")


def resolve_precision(precision: str, cuda: bool) -> str:
    """`precision` with "auto" resolved: the compute dtype `vlm.loading.default_dtype` picks (bf16
    on GPUs with native bf16, fp16 on older ones), fp32 on CPU. fp16 needs a GPU."""
    if precision == "auto":
        precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(default_dtype("cuda" if cuda else "cpu"), "fp32")
    if precision == "fp16" and not cuda:
        raise VLMError("precision=fp16 needs a GPU; use bf16 or fp32 on CPU")
    return precision


def apply_prompts(processor, config: TrainConfig) -> None:
    """Set the processor's caption prompt / question template from the config (validated)."""
    if config.prompt.caption_prompt is not None:
        processor.caption_prompt = config.prompt.caption_prompt
    template = config.prompt.question_template
    if template is not None:
        if template.count("{}") != 1:
            raise VLMError(f"prompt.question_template must hold exactly one {{}} for the question, got {template!r}")
        processor.question_template = template


def draw_untrained_queries(model) -> None:
    """Query tokens that are all zero, as transformers initialises a BLIP-2 model it has no weights for,
    are drawn as BLIP-2 draws them (normal, std `initializer_range`) when they are to train.

    The Q-Former's first layer normalises them: a LayerNorm of a constant vector has a gradient of
    ~1/sqrt(eps) (measured: an infinite gradient norm for ITC on a fresh `Blip2ForImageTextRetrieval`),
    and clipping that to `max_grad_norm` leaves every other weight without an update.
    """
    bare = model.get_base_model() if is_peft(model) else model
    queries = getattr(bare, "query_tokens", None)
    if queries is None or not queries.requires_grad or queries.count_nonzero() > 0:
        return
    with torch.no_grad():
        queries.normal_(0.0, bare.config.initializer_range)
    logger.warning("the query tokens were all zero (an untrained checkpoint): drawn from N(0, %s), as BLIP-2 "
                   "initialises them", bare.config.initializer_range)


def trainable_in_fp32(model) -> None:
    """Master copies of the parameters that train in fp32 (optimizer updates lost in bf16's
    8-bit mantissa otherwise); frozen ones stay in the compute dtype."""
    for param in model.parameters():
        if param.requires_grad and param.dtype in (torch.float16, torch.bfloat16):
            param.data = param.data.float()


def trainable_parameter_count(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def unfreeze(model, prefixes, key: str) -> None:
    """Train the floating-point parameters whose names are, or start with, one of `prefixes`; a
    prefix that names no parameter is a VLMError naming the config `key` it came from."""
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


def freeze_text_side(model) -> None:
    """Stage 2 feeds BLIP-2's Q-Former its queries only: the feed-forward layers of its text side
    (kept for stage 1's ITC/ITM/ITG) are not run, so they stay frozen (DDP, with unused-parameter
    detection off, fails on a trainable parameter that gets no gradient). InstructBLIP's reads the
    instruction: they are run."""
    from vlm.image_text import TEXT_FFN

    if model.config.qformer_reads_instruction:
        return
    for name, param in model.named_parameters():
        if TEXT_FFN.match(name):
            param.requires_grad_(False)
