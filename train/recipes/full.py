"""`full`: the parameters whose names start with an entry of `unfreeze` train (the LLM too, if named)."""

from __future__ import annotations

from vlm.errors import VLMError

from . import register_recipe
from .base import Recipe, unfreeze


@register_recipe
class FullRecipe(Recipe):
    """Trains the parameters named by `config.unfreeze` (name prefixes)."""

    name = "full"
    summary = "train the parameters named by `unfreeze` (name prefixes)"

    def select_trainable(self, model):
        if not self.config.unfreeze:
            raise VLMError("unfreeze: the full recipe needs at least one module prefix to train")
        unfreeze(model, self.config.unfreeze, "unfreeze")
        return model
