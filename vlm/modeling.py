"""`VisionLanguageModel`: vision tower -> Q-Former -> projection -> causal LLM.

Module names match transformers' `Blip2ForConditionalGeneration` and
`InstructBlipForConditionalGeneration` (`vision_model`, `query_tokens`, `qformer`,
`language_projection`, `language_model`), so their checkpoints load 1:1. The image path up to the
soft prompt is `vlm.bridge.QFormerBridge`, shared with the stage-1 `ImageTextModel`.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageTextToText,
    AutoModelForCausalLM,
    GenerationMixin,
    PreTrainedModel,
)
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration import VLMConfig
from .image_text import (
    IMAGE_TEXT_MODULES,
    ImageTextModel,
    ImageTextScoring,
    add_image_text_parts,
    init_image_text_weights,
)


class VisionLanguageModel(ImageTextScoring, PreTrainedModel, GenerationMixin):
    """A frozen image encoder and a frozen causal LLM bridged by a trainable Q-Former.

    Images enter as `pixel_values` of shape `(num_images, 3, H, W)`; each image fills, in
    reading order, the next block of `num_query_tokens` `<image>` tokens in `input_ids`, so a
    sample may hold any number of images at any positions.
    """

    config_class = VLMConfig
    config: VLMConfig
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = False  # the fp32 Q-Former blocks flash attention
    _supports_attention_backend = True
    _skip_keys_device_placement = ["past_key_values"]

    def __init__(self, config: VLMConfig):
        super().__init__(config)
        self.build_bridge(config, projection=True)
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        if config.has_image_text_heads:  # BLIP-2's stage-1 parts, kept through stage 2
            add_image_text_parts(self, config)
            self._tied_weights_keys = dict(ImageTextModel._tied_weights_keys)
        self._no_split_modules = sorted(
            {
                *(self.vision_model._no_split_modules or []),
                *(self.language_model._no_split_modules or []),
                "Blip2QFormerLayer",
                "InstructBlipQFormerLayer",
            }
        )
        self.post_init()
        self.freeze_frozen_parts()

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if module is self:
            nn.init.normal_(self.query_tokens, mean=0.0, std=self.config.initializer_range)
        if self.config.has_image_text_heads:
            init_image_text_weights(self, module)

    @classmethod
    def from_pretrained(cls, *args, **kwargs) -> VisionLanguageModel:
        """`PreTrainedModel.from_pretrained`, then the BLIP-2 default freezing.

        Loading materialises fresh parameters (all trainable), so the freeze is applied again.
        """
        model = super().from_pretrained(*args, **kwargs)
        model.freeze_frozen_parts()
        return model

    def freeze_frozen_parts(self) -> None:
        """BLIP-2 default: vision tower and LLM frozen; queries, Q-Former and projection train
        (stage 2: the stage-1 heads, if any, stay as stage 1 left them)."""
        self.vision_model.requires_grad_(False)
        self.language_model.requires_grad_(False)
        for name in IMAGE_TEXT_MODULES:
            if hasattr(self, name):
                getattr(self, name).requires_grad_(False)

    # -- embeddings plumbing, so GenerationMixin / peft / resize_token_embeddings work ----------
    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, new_embeddings: nn.Module) -> None:
        self.language_model.set_output_embeddings(new_embeddings)

    def get_decoder(self):
        return self.language_model.get_decoder()

    def embed_inputs(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.Tensor | None = None,
        vision_features: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        qformer_input_ids: torch.LongTensor | None = None,
        qformer_attention_mask: torch.LongTensor | None = None,
    ) -> torch.Tensor:
        """LLM input embeddings with each `<image>` block replaced by its image's soft prompt."""
        inputs_embeds = self.get_input_embeddings()(input_ids)
        image_mask = input_ids == self.config.image_token_index
        num_image_tokens = int(image_mask.sum())
        has_images = pixel_values is not None or vision_features is not None or image_features is not None
        if num_image_tokens == 0:
            if has_images:
                raise ValueError("images were given but input_ids hold no <image> tokens (was the processor used?)")
            return inputs_embeds
        if not has_images:
            raise ValueError(f"input_ids hold {num_image_tokens} <image> tokens but no images were given")
        if image_features is None:
            image_features = self.get_image_features(
                pixel_values, vision_features, qformer_input_ids, qformer_attention_mask
            )
        if image_features.shape[0] * image_features.shape[1] != num_image_tokens:
            raise ValueError(
                f"input_ids hold {num_image_tokens} <image> tokens but {image_features.shape[0]} images x "
                f"{image_features.shape[1]} queries = {image_features.shape[0] * image_features.shape[1]} were given"
            )
        image_features = image_features.to(inputs_embeds.device, inputs_embeds.dtype)
        return inputs_embeds.masked_scatter(image_mask.unsqueeze(-1), image_features)

    # -- training / scoring -----------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        vision_features: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        qformer_input_ids: torch.LongTensor | None = None,
        qformer_attention_mask: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Run the LLM on text with images spliced in; `labels` (-100 = no loss) give the LM loss."""
        if inputs_embeds is None:
            inputs_embeds = self.embed_inputs(
                input_ids, pixel_values, vision_features, image_features, qformer_input_ids, qformer_attention_mask
            )
        return self.language_model(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels, return_dict=True, **kwargs
        )

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        vision_features: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        qformer_input_ids: torch.LongTensor | None = None,
        qformer_attention_mask: torch.LongTensor | None = None,
        **generate_kwargs,
    ) -> torch.LongTensor:
        """Generate text; returns `input_ids` followed by the new tokens, as BLIP-2 does.

        The images are encoded once, then the LLM's own `generate` runs on the spliced
        embeddings, so every decoding strategy (greedy, beam, sampling, streamers) works with
        the KV cache. Prompts must be left-padded (the processor does this).
        """
        if input_ids is None:
            raise ValueError("generate needs input_ids (use VLMProcessor to build them)")
        device = self.get_input_embeddings().weight.device
        input_ids = input_ids.to(device)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        inputs_embeds = self.embed_inputs(
            input_ids, pixel_values, vision_features, image_features, qformer_input_ids, qformer_attention_mask
        )
        # Our saved generation defaults, overridden by any generation kwargs of this call.
        generation_config = copy.deepcopy(generate_kwargs.pop("generation_config", None) or self.generation_config)
        generate_kwargs = generation_config.update(**generate_kwargs)
        return self.language_model.generate(
            generation_config=generation_config,
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask.to(device),
            **generate_kwargs,
        )


# So AutoConfig / AutoModel / AutoModelForImageTextToText open `vlm` folders.
AutoConfig.register(VLMConfig.model_type, VLMConfig, exist_ok=True)
AutoModel.register(VLMConfig, VisionLanguageModel, exist_ok=True)
AutoModelForImageTextToText.register(VLMConfig, VisionLanguageModel, exist_ok=True)
