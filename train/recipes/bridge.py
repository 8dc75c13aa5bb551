"""`bridge`: BLIP-2's stage 2. The Q-Former, its query tokens and the projection train on the LLM's
next-token loss; the vision tower and the LLM stay frozen."""

from __future__ import annotations

from ..config import BRIDGE_MODULES
from . import register_recipe
from .base import Recipe, freeze_text_side, unfreeze


@register_recipe
class BridgeRecipe(Recipe):
    """Q-Former, queries and projection train; vision tower and LLM frozen."""

    name = "bridge"
    summary = "Q-Former, queries and projection train; vision tower and LLM frozen (BLIP-2 stage 2)"

    def select_trainable(self, model):
        unfreeze(model, BRIDGE_MODULES, "bridge")
        freeze_text_side(model)
        return model
