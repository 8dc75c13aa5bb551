"""A training recipe from outside vlm, as another package would ship it (tests/test_train.py registers it
through an entry point and trains it with `vlm train`): only the projection into the LLM trains, on the
LLM's loss; the recipe logs its weight's norm and writes a note beside the model it saves."""

from __future__ import annotations

import json

from vlm.train.recipes import Recipe
from vlm.train.recipes.base import unfreeze
from vlm.train.save import base_model


class ProjectionOnly(Recipe):
    name = "projection-only"
    summary = "only the projection into the LLM trains"
    defaults = {"learning_rate": 1e-2, "warmup": 0}

    def select_trainable(self, model):
        unfreeze(model, ["language_projection"], self.name)
        return model

    def compute_loss(self, trainer, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(trainer, model, inputs, return_outputs, num_items_in_batch)
        if model.training:
            projection = base_model(trainer.accelerator.unwrap_model(model)).language_projection
            trainer.log_loss_parts({"projection_norm": projection.weight.detach().norm()})
        return result

    def save(self, model, processor, state_dict=None):
        out = super().save(model, processor, state_dict)
        (out / "projection-only.json").write_text(json.dumps({"trained": "language_projection"}))
        return out
