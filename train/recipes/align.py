"""`align`: a fast first stage for a new bridge, on captions only (the loss: `vlm.train.align`).

The bridge trains as in `bridge`, but its loss reads the soft prompt through the LLM's word
embeddings (a bag of the caption's words) instead of running the LLM: a step costs the Q-Former.
"""

from __future__ import annotations

from collections.abc import Sequence

from vlm.errors import VLMError

from ..align import bag_of_words_loss
from ..save import base_model
from . import register_recipe
from .base import check_image_captions
from .bridge import BridgeRecipe


@register_recipe
class AlignRecipe(BridgeRecipe):
    """The bridge learns to put each caption's words into its soft prompt; no LLM layer runs."""

    name = "align"
    summary = "the bridge alone, on captions, scored through the LLM's word embeddings (a fast first stage)"
    loss_is_scaled_for_ga = False  # a per-batch mean

    def check_data(self, train_examples: Sequence, eval_examples: Sequence | None, processes: int) -> None:
        """Caption rows with an image only, in one process (its loss runs outside the model's forward,
        where DDP would not see it)."""
        check_image_captions([*train_examples, *(eval_examples or [])], self.name)
        if processes > 1:
            raise VLMError("the align recipe runs in one process; launch it without accelerate/torchrun")

    def compute_loss(self, trainer, model, inputs: dict, return_outputs: bool = False, num_items_in_batch=None):
        bare = base_model(trainer.accelerator.unwrap_model(model))
        with trainer.accelerator.autocast():
            # Special tokens (end of turn, padding) are not words of the caption.
            loss = bag_of_words_loss(bare, inputs, self.processor.tokenizer.all_special_ids)
        return (loss, {"loss": loss}) if return_outputs else loss
