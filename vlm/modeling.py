"""`VisionLanguageModel`: vision tower -> Q-Former -> projection -> causal LLM.

Module names match transformers' `Blip2ForConditionalGeneration` and
`InstructBlipForConditionalGeneration` (`vision_model`, `query_tokens`, `qformer`,
`language_projection`, `language_model`), so their checkpoints load 1:1.
"""

from __future__ import annotations

import contextlib
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
from .towers import build_qformer, build_vision_tower
from .image_text import (
    IMAGE_TEXT_MODULES,
    ImageTextModel,
    ImageTextScoring,
    add_image_text_parts,
    init_image_text_weights,
)

def _no_fp16_autocast(device_type: str):
    """Autocast off when it is fp16 (V100/T4 training, FSDP's fp16 mixed precision): BLIP-2 keeps
    the Q-Former out of fp16, where it is unstable. bf16 autocast stays on, as in transformers."""
    fp16 = torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) == torch.float16
    return torch.autocast(device_type, enabled=False) if fp16 else contextlib.nullcontext()


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
    # BLIP-2 keeps these in fp32 whatever the load dtype: the Q-Former is unstable in fp16.
    _keep_in_fp32_modules = ["query_tokens", "qformer"]
    _skip_keys_device_placement = ["past_key_values"]

    def __init__(self, config: VLMConfig):
        super().__init__(config)
        self.vision_model = build_vision_tower(config.vision_config)
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, config.qformer_config.hidden_size))
        self.qformer = build_qformer(config.qformer_config)
        self.language_projection = nn.Linear(config.qformer_config.hidden_size, config.text_config.hidden_size)
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

    # -- image path ----------------------------------------------------------------------------
    def get_vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Patch features of the vision tower, `(num_images, num_patches, vision_width)`."""
        param = next(self.vision_model.parameters())
        pixel_values = pixel_values.to(param.device, param.dtype)
        return self.vision_model(pixel_values=pixel_values, return_dict=True).last_hidden_state

    def get_image_features(
        self,
        pixel_values: torch.Tensor | None = None,
        vision_features: torch.Tensor | None = None,
        qformer_input_ids: torch.LongTensor | None = None,
        qformer_attention_mask: torch.LongTensor | None = None,
    ) -> torch.Tensor:
        """Soft-prompt embeddings for each image, `(num_images, num_query_tokens, llm_width)`.

        Pass `vision_features` (from `get_vision_features`) to reuse an image's encoding across
        prompts. InstructBLIP-style Q-Formers also need the instruction (`qformer_input_ids`),
        one row per image.
        """
        if vision_features is None:
            if pixel_values is None:
                raise ValueError("get_image_features needs pixel_values or vision_features")
            vision_features = self.get_vision_features(pixel_values)
        num_images = vision_features.shape[0]
        query_tokens = self.query_tokens.expand(num_images, -1, -1)
        # The Q-Former computes in its own weights' dtype (fp32 when the model loads in fp16, as
        # BLIP-2 keeps it), whatever dtype the frozen vision tower outputs.
        vision_features = vision_features.to(query_tokens.dtype)
        image_attention_mask = torch.ones(vision_features.shape[:-1], dtype=torch.long, device=vision_features.device)
        qformer_kwargs = {}
        if self.config.qformer_reads_instruction:
            if qformer_input_ids is None:
                raise ValueError("this model's Q-Former reads the instruction: pass qformer_input_ids")
            if qformer_input_ids.shape[0] != num_images:
                raise ValueError(
                    f"qformer_input_ids has {qformer_input_ids.shape[0]} rows but there are {num_images} images"
                )
            if qformer_attention_mask is None:
                qformer_attention_mask = torch.ones_like(qformer_input_ids)
            query_mask = torch.ones(query_tokens.shape[:-1], dtype=torch.long, device=query_tokens.device)
            qformer_kwargs = {
                "input_ids": qformer_input_ids.to(query_tokens.device),
                "attention_mask": torch.cat([query_mask, qformer_attention_mask.to(query_mask.device)], dim=1),
            }
        with _no_fp16_autocast(vision_features.device.type):
            query_output = self.qformer(
                query_embeds=query_tokens,
                encoder_hidden_states=vision_features,
                encoder_attention_mask=image_attention_mask,
                return_dict=True,
                **qformer_kwargs,
            ).last_hidden_state[:, : self.config.num_query_tokens, :]
        projection = self.language_projection.weight
        return self.language_projection(query_output.to(projection.dtype))

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
