"""The vision tower and Q-Former classes `vlm` builds, from their configs."""

from __future__ import annotations

from transformers import (
    AutoModel,
    Blip2QFormerModel,
    Blip2VisionModel,
    InstructBlipQFormerModel,
    InstructBlipVisionModel,
    PreTrainedModel,
)

# AutoModel has no mapping for these two vision-only configs.
_VISION_CLASSES = {
    "blip_2_vision_model": Blip2VisionModel,
    "instructblip_vision_model": InstructBlipVisionModel,
}
_QFORMER_CLASSES = {
    "blip_2_qformer": Blip2QFormerModel,
    "instructblip_qformer": InstructBlipQFormerModel,
}


def vision_tower_class(config) -> type[PreTrainedModel]:
    """The transformers class of the vision encoder described by `config`."""
    return _VISION_CLASSES.get(config.model_type) or AutoModel._model_mapping[type(config)]


def build_vision_tower(config) -> PreTrainedModel:
    """An untrained vision encoder for `config` (weights come from `from_pretrained` later)."""
    return vision_tower_class(config)._from_config(config)


def build_qformer(config) -> PreTrainedModel:
    """An untrained BLIP-2 or InstructBLIP Q-Former for `config`."""
    return _QFORMER_CLASSES[config.model_type]._from_config(config)
