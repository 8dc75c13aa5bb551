"""`VLMConfig`: a vision encoder, a Q-Former and a causal LLM, composed BLIP-2 style."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

# Vision towers we know how to call (pixel_values -> last_hidden_state).
SUPPORTED_VISION_TYPES = (
    "blip_2_vision_model",
    "instructblip_vision_model",
    "clip_vision_model",
    "siglip_vision_model",
    "dinov2",
)
# blip_2_qformer reads only the queries; instructblip_qformer also reads the instruction.
SUPPORTED_QFORMER_TYPES = ("blip_2_qformer", "instructblip_qformer")


@strict
class VLMConfig(PreTrainedConfig):
    r"""Configuration of a [`VisionLanguageModel`].

    Args:
        vision_config: config of the image encoder (BLIP-2/InstructBLIP vision, CLIP vision,
            SigLIP vision or DINOv2).
        qformer_config: a `Blip2QFormerConfig` (queries only) or an `InstructBlipQFormerConfig`
            (the Q-Former also reads the instruction). Its `encoder_hidden_size` is set to the
            vision width.
        text_config: config of any causal LM that `AutoModelForCausalLM` can build.
        num_query_tokens: number of learned queries, i.e. soft-prompt tokens per image.
        image_token_index: id of the `<image>` placeholder token in the LLM vocabulary.
        image_text_hidden_size: width of the image-text (ITC) embeddings when the model carries
            BLIP-2's stage-1 parts (the Q-Former's text side, ITC/ITM/ITG heads: `vlm.image_text`);
            None for a model without them.
    """

    model_type = "vlm"
    attribute_map = {"image_token_id": "image_token_index"}
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="blip_2_vision_model"),
        "qformer_config": SubConfigSpec(config_class=AutoConfig, model_type="blip_2_qformer"),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
    }

    vision_config: dict | PreTrainedConfig | None = None
    qformer_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    num_query_tokens: int = 32
    image_token_index: int | None = None
    image_text_hidden_size: int | None = None
    # Ties the stage-1 ITG head's decoder to the Q-Former's word embeddings, as BERT's LM head.
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.qformer_config.encoder_hidden_size = self.vision_config.hidden_size
        if self.image_text_hidden_size:
            self.qformer_config.use_qformer_text_input = True  # the Q-Former's text FFN, for ITC/ITM/ITG

    def validate_architecture(self):
        """Reject combinations the model cannot build, naming the offending sub-config."""
        super().validate_architecture()
        for key, kind in (("num_query_tokens", int), ("image_token_index", (int, type(None))),
                          ("image_text_hidden_size", (int, type(None)))):
            value = getattr(self, key)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise ValueError(f"{key} must be an integer, got {value!r}")
        if self.vision_config.model_type not in SUPPORTED_VISION_TYPES:
            raise ValueError(
                f"vision_config.model_type={self.vision_config.model_type!r} is not supported; "
                f"use one of {', '.join(SUPPORTED_VISION_TYPES)}"
            )
        if self.qformer_config.model_type not in SUPPORTED_QFORMER_TYPES:
            raise ValueError(
                f"qformer_config.model_type={self.qformer_config.model_type!r} is not supported; "
                f"use one of {', '.join(SUPPORTED_QFORMER_TYPES)}"
            )
        if self.text_config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            raise ValueError(
                f"text_config.model_type={self.text_config.model_type!r} is not a causal LM "
                "(encoder-decoder LLMs such as T5 are not supported)"
            )
        if self.num_query_tokens < 1:
            raise ValueError(f"num_query_tokens must be >= 1, got {self.num_query_tokens}")

    @property
    def has_image_text_heads(self) -> bool:
        """True when the model carries BLIP-2's stage-1 parts (ITC/ITM scoring, stage-1 training)."""
        return bool(self.image_text_hidden_size)

    @property
    def qformer_reads_instruction(self) -> bool:
        """True for InstructBLIP-style Q-Formers, which also attend to the instruction text."""
        return self.qformer_config.model_type == "instructblip_qformer"
