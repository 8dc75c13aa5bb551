"""The Q-Former bridge: vision tower -> query tokens -> Q-Former (-> projection), written once.

`VisionLanguageModel` (the projection into its LLM) and `ImageTextModel` (BLIP-2's stage 1: the
image-text heads of `vlm.image_text` instead) both run their images and texts through this class.
It is a mixin rather than a submodule so that its modules stay top-level attributes of the model:
weight names match transformers' BLIP-2 classes 1:1 (`vision_model`, `query_tokens`, `qformer`,
`language_projection`), and their checkpoints load as they are.

The fp16 rule lives here, around the one call of the Q-Former that every path shares (image
queries, text, ITM, ITG): BLIP-2 keeps the Q-Former out of fp16, where it is unstable, so fp16
autocast (V100/T4 training, FSDP's fp16 mixed precision) is switched off inside it and it computes
in its own weights' dtype; bf16 autocast stays on, as in transformers.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from .configuration import VLMConfig
from .towers import build_qformer, build_vision_tower


def no_fp16_autocast(device_type: str):
    """Autocast switched off when it is fp16; a no-op otherwise (bf16 autocast stays on)."""
    fp16 = torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) == torch.float16
    return torch.autocast(device_type, enabled=False) if fp16 else contextlib.nullcontext()


class QFormerBridge:
    """Vision tower, learned queries, Q-Former and (optionally) the projection to an LLM: a mixin for
    `PreTrainedModel`s whose config is a `VLMConfig`."""

    config: VLMConfig
    # BLIP-2 keeps these in fp32 whatever the load dtype: the Q-Former is unstable in fp16.
    _keep_in_fp32_modules = ["query_tokens", "qformer"]

    def build_bridge(self, config: VLMConfig, projection: bool) -> None:
        """Create the bridge's modules (untrained; weights come from `from_pretrained` or `_init_weights`).
        `projection`: also the Linear from the Q-Former's width to the LLM's."""
        self.vision_model = build_vision_tower(config.vision_config)
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, config.qformer_config.hidden_size))
        self.qformer = build_qformer(config.qformer_config)
        if projection:
            self.language_projection = nn.Linear(config.qformer_config.hidden_size, config.text_config.hidden_size)

    @property
    def is_gradient_checkpointing(self) -> bool:
        """transformers 5's `is_activation_checkpointing` under its old name, which peft still reads
        (the inherited property warns that the name is deprecated on every adapter load)."""
        return self.is_activation_checkpointing

    def get_vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Patch features of the vision tower, `(num_images, num_patches, vision_width)`."""
        param = next(self.vision_model.parameters())
        pixel_values = pixel_values.to(param.device, param.dtype)
        return self.vision_model(pixel_values=pixel_values, return_dict=True).last_hidden_state

    def run_qformer(self, query_embeds: torch.Tensor, vision_features: torch.Tensor | None = None,
                    **kwargs) -> torch.Tensor:
        """The Q-Former's last hidden state for `query_embeds` (queries, text, or both), cross-attending to
        `vision_features` when given. Every Q-Former call goes through here, under the fp16 rule."""
        if vision_features is not None:
            # The Q-Former computes in its own weights' dtype (fp32 when the model loads in fp16, as
            # BLIP-2 keeps it), whatever dtype the frozen vision tower outputs.
            vision_features = vision_features.to(self.query_tokens.dtype)
            kwargs["encoder_hidden_states"] = vision_features
            kwargs["encoder_attention_mask"] = torch.ones(vision_features.shape[:-1], dtype=torch.long,
                                                          device=vision_features.device)
        with no_fp16_autocast(query_embeds.device.type):
            return self.qformer(query_embeds=query_embeds, return_dict=True, **kwargs).last_hidden_state

    def query_features(
        self,
        pixel_values: torch.Tensor | None = None,
        vision_features: torch.Tensor | None = None,
        qformer_input_ids: torch.LongTensor | None = None,
        qformer_attention_mask: torch.LongTensor | None = None,
    ) -> torch.Tensor:
        """The Q-Former's query outputs for images, `(images, queries, hidden)`.

        InstructBLIP-style Q-Formers also read the instruction (`qformer_input_ids`), one row per image.
        """
        if vision_features is None:
            if pixel_values is None:
                raise ValueError("the image path needs pixel_values or vision_features")
            vision_features = self.get_vision_features(pixel_values)
        num_images = vision_features.shape[0]
        query_tokens = self.query_tokens.expand(num_images, -1, -1)
        kwargs = {}
        if self.config.qformer_reads_instruction:
            kwargs = self._instruction_inputs(query_tokens, qformer_input_ids, qformer_attention_mask)
        hidden = self.run_qformer(query_tokens, vision_features, **kwargs)
        return hidden[:, : query_tokens.shape[1], :]

    def _instruction_inputs(self, query_tokens: torch.Tensor, input_ids: torch.LongTensor | None,
                            attention_mask: torch.LongTensor | None) -> dict:
        """`input_ids` / `attention_mask` for an InstructBLIP Q-Former (queries first, then the instruction)."""
        if input_ids is None:
            raise ValueError("this model's Q-Former reads the instruction: pass qformer_input_ids")
        if input_ids.shape[0] != query_tokens.shape[0]:
            raise ValueError(f"qformer_input_ids has {input_ids.shape[0]} rows but there are "
                             f"{query_tokens.shape[0]} images")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        query_mask = torch.ones(query_tokens.shape[:-1], dtype=torch.long, device=query_tokens.device)
        return {"input_ids": input_ids.to(query_tokens.device),
                "attention_mask": torch.cat([query_mask, attention_mask.to(query_mask.device)], dim=1)}

    def get_image_features(
        self,
        pixel_values: torch.Tensor | None = None,
        vision_features: torch.Tensor | None = None,
        qformer_input_ids: torch.LongTensor | None = None,
        qformer_attention_mask: torch.LongTensor | None = None,
    ) -> torch.Tensor:
        """Soft-prompt embeddings for each image, `(num_images, num_query_tokens, llm_width)`: the query
        outputs through `language_projection`.

        Pass `vision_features` (from `get_vision_features`) to reuse an image's encoding across prompts.
        """
        query_output = self.query_features(pixel_values, vision_features, qformer_input_ids, qformer_attention_mask)
        projection = self.language_projection.weight
        return self.language_projection(query_output.to(projection.dtype))
