"""`stage1`: BLIP-2's stage 1, with no LLM loaded.

The queries, the Q-Former, its text side and the ITC / ITM / ITG heads learn from captions
(`vlm.stage1_losses`); the vision tower is frozen. With `stage1.train_query_path: false` only the
text side and the heads train (fitted to a finished stage-2 bridge). The output carries the base's
LLM, so stage 2 (`bridge`, `lora`) starts from it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from vlm import load_pretrained
from vlm.errors import VLMError
from vlm.files import BRIDGE_WEIGHTS
from vlm.image_text import IMAGE_TEXT_MODULES, ImageTextModel, is_stage1_weight
from vlm.loading import model_class, model_folder, read_vlm_config

from ..save import save_stage1
from ..stage1_data import Stage1Collator, Stage1Dataset, decoder_start_id, qformer_tokenizer
from . import register_recipe
from .base import Recipe, check_image_captions, unfreeze

# What stage 1 trains: everything but the (frozen) vision tower.
STAGE1_MODULES = ("query_tokens", "qformer", *IMAGE_TEXT_MODULES)
OBJECTIVES = ("itc", "itm", "itg")


@register_recipe
class Stage1Recipe(Recipe):
    """BLIP-2 stage 1 on image captions: ITC + ITM + ITG, each logged (`loss_itc`, ...)."""

    name = "stage1"
    summary = "BLIP-2 stage 1 on captions, no LLM loaded: queries, Q-Former and its text side learn ITC, ITM, ITG"
    loss_is_scaled_for_ga = False  # per-batch means
    # BLIP-2's 1e-4 moves a fresh Q-Former's weights too little in the hundreds to thousands of steps
    # a custom data set gets (250k steps at batch 2,320 in the paper): measured, 1e-4 left ITC at
    # ln(batch) for 300 steps, 2e-3 learned retrieval (README, Fine-tune).
    defaults = {"learning_rate": 2e-3}

    def check_data(self, train_examples: Sequence, eval_examples: Sequence | None, processes: int) -> None:
        check_image_captions([*train_examples, *(eval_examples or [])], self.name)

    def load(self, device: str | None, dtype: torch.dtype):
        model, processor = load_image_text_model(self.config.model, device=device, dtype=dtype)
        if self.config.stage1.dropout is not None:
            set_dropout(model.qformer, self.config.stage1.dropout)
        return model, processor

    def select_trainable(self, model):
        settings = self.config.stage1
        unfreeze(model, STAGE1_MODULES, "stage1")
        if not settings.train_word_embeddings:
            model.embeddings.word_embeddings.requires_grad_(False)
        if not settings.train_query_path:
            freeze_query_path(model)
        freeze_unweighted_heads(model, {name: getattr(settings, name) for name in OBJECTIVES})
        return model

    def datasets(self, processor, train_examples: Sequence, eval_examples: Sequence | None, processes: int = 1):
        # Several processes gather each other's captions for ITC/ITM: every batch must have one width.
        collator = Stage1Collator(qformer_tokenizer(processor), self.config.stage1.max_text_length,
                                  same_width=processes > 1)
        evaluation = Stage1Dataset(eval_examples, processor) if eval_examples else None
        return Stage1Dataset(train_examples, processor), evaluation, collator

    def compute_loss(self, trainer, model, inputs: dict, return_outputs: bool = False, num_items_in_batch=None):
        settings = self.config.stage1
        with trainer.accelerator.autocast():
            losses = model(**inputs, decoder_start_id=decoder_start_id(qformer_tokenizer(self.processor)),
                           weights={name: getattr(settings, name) for name in OBJECTIVES},
                           negatives=settings.hard_negatives)
        if model.training:  # an evaluation batch is not part of the training log
            trainer.log_loss_parts({name: losses[name] for name in OBJECTIVES})
        loss = losses["loss"]
        return (loss, {"loss": loss}) if return_outputs else loss

    def save(self, model, processor, state_dict: dict | None = None) -> Path:
        return save_stage1(model, processor, self.config, state_dict)


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


def set_dropout(module: nn.Module, p: float) -> None:
    """Set every dropout layer in `module` to `p` (in a BERT-style Q-Former: those on its hidden
    states; attention-probability dropout is not a layer)."""
    for layer in module.modules():
        if isinstance(layer, nn.Dropout):
            layer.p = p


# Every trainable parameter must get a gradient at every step: DDP (find_unused_parameters off)
# fails on the next step otherwise. So parts a recipe never runs stay frozen.
def freeze_unweighted_heads(model, weights: dict[str, float]) -> None:
    """Stage 1 skips an objective of weight 0, so its head gets no gradient."""
    tied = model.embeddings.word_embeddings.weight  # ITG's decoder: the word embeddings, used by ITC/ITM too
    for objective, head in (("itm", model.itm_head), ("itg", model.itg_head)):
        if not weights[objective]:
            for param in head.parameters():
                if param is not tied:
                    param.requires_grad_(False)


def freeze_query_path(model) -> None:
    """Freeze all that stage 2 runs (queries, the Q-Former's shared layers): only the text side and
    the heads (`is_stage1_weight`) stay trainable, so they fit the bridge as it is."""
    for name, param in model.named_parameters():
        if not is_stage1_weight(name):
            param.requires_grad_(False)
