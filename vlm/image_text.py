"""BLIP-2's stage-1 parts: the Q-Former's text side, the ITC / ITM / ITG heads, and image-text scoring.

Module names are those of transformers' `Blip2ForImageTextRetrieval` (`embeddings`,
`vision_projection`, `text_projection`, `itm_head`; the Q-Former built with
`use_qformer_text_input`), so official retrieval checkpoints load 1:1. `itg_head` (BERT's LM head,
its decoder tied to the Q-Former's word embeddings) and `temp` (the learnable ITC temperature) are
LAVIS's and exist only in checkpoints `vlm` trains.

`ImageTextModel` is the stage-1 model: vision tower, queries, Q-Former and these parts, no LLM.
`VisionLanguageModel` carries the same parts when its config has `image_text_hidden_size`, so one
checkpoint holds both stages. Both run the Q-Former through `vlm.bridge.QFormerBridge` (one code
path, one fp16 rule); these parts are its optional stage-1 half. Scoring works on either
(`ImageTextScoring`):

    image = model.image_embeddings(pixel_values)        # (images, queries, D), normalised
    text = model.text_embeddings(input_ids, mask)       # (texts, D), normalised
    itc = model.itc_scores(image, text)                 # (images, texts): cosine, max over queries
    itm = model.itm_scores(vision_features, ids, mask)  # (pairs,): match probability
"""

from __future__ import annotations

import re

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.activations import ACT2FN
from transformers.models.blip_2.modeling_blip_2 import Blip2TextEmbeddings

from .bridge import QFormerBridge
from .configuration import VLMConfig

ITC_TEMPERATURE = 0.07  # BLIP-2's initial value


class ItgHead(nn.Module):
    """BERT's LM prediction head for image-grounded text generation (ITG)."""

    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = ACT2FN[config.hidden_act] if isinstance(config.hidden_act, str) else config.hidden_act
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.LayerNorm(self.act(self.dense(hidden_states))))


def init_image_text_weights(model: nn.Module, module: nn.Module) -> None:
    """`_init_weights` for the stage-1 parts (transformers' generic init knows neither)."""
    if isinstance(module, Blip2TextEmbeddings):  # a non-persistent buffer: never in a checkpoint
        length = module.position_ids.shape[-1]
        module.position_ids.copy_(torch.arange(length, device=module.position_ids.device).expand((1, -1)))
    elif module is model:
        nn.init.constant_(model.temp, ITC_TEMPERATURE)


def add_image_text_parts(model: nn.Module, config: VLMConfig) -> None:
    """Give `model` the stage-1 modules for `config` (its Q-Former must read text)."""
    qconfig = config.qformer_config
    model.embeddings = Blip2TextEmbeddings(qconfig)
    model.vision_projection = nn.Linear(qconfig.hidden_size, config.image_text_hidden_size)
    model.text_projection = nn.Linear(qconfig.hidden_size, config.image_text_hidden_size)
    model.itm_head = nn.Linear(qconfig.hidden_size, 2)
    # Its dense layer and LayerNorm start from transformers' generic init (a BERT checkpoint has
    # no LM head under these names); its decoder is tied to the word embeddings.
    model.itg_head = ItgHead(qconfig)
    model.temp = nn.Parameter(torch.tensor(ITC_TEMPERATURE))


IMAGE_TEXT_MODULES = ("embeddings", "vision_projection", "text_projection", "itm_head", "itg_head", "temp")
# The Q-Former's text-side feed-forward layers (`use_qformer_text_input`): they run on text only,
# so stage 1 trains them and BLIP-2's stage 2, which feeds the Q-Former its queries, never does.
TEXT_FFN = re.compile(r"^qformer\.encoder\.layer\.\d+\.(?:intermediate|output)\.")


def is_stage1_weight(name: str) -> bool:
    """Whether a state-dict key belongs to what only stage 1 trains: the heads, the text
    embeddings and the Q-Former's text-side feed-forward layers."""
    return name.split(".")[0] in IMAGE_TEXT_MODULES or TEXT_FFN.match(name) is not None


class ImageTextScoring(QFormerBridge):
    """ITC / ITM scoring and embeddings for a model with the stage-1 parts (the bridge's optional half)."""

    config: VLMConfig

    def image_embeddings(self, pixel_values=None, vision_features=None) -> torch.Tensor:
        """Normalised image embeddings, one per query: `(images, queries, image_text_hidden_size)`."""
        features = self.query_features(pixel_values, vision_features)
        return nn.functional.normalize(self.vision_projection(features.to(self.vision_projection.weight.dtype)), dim=-1)

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The Q-Former's text-only outputs (`(texts, length, hidden)`), as for ITC."""
        embeds = self.embeddings(input_ids=input_ids)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        return self.run_qformer(embeds, query_length=0, attention_mask=mask.to(embeds.device))

    def text_embeddings(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised text embeddings from the [CLS] position: `(texts, image_text_hidden_size)`."""
        cls = self.text_features(input_ids, attention_mask)[:, 0, :]
        return nn.functional.normalize(self.text_projection(cls.to(self.text_projection.weight.dtype)), dim=-1)

    @staticmethod
    def itc_scores(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """Image-text similarity `(images, texts)`: cosine, the best of the queries (no temperature)."""
        return torch.einsum("iqd,td->itq", image_embeds, text_embeds.to(image_embeds.dtype)).max(dim=-1).values

    def itm_logits(self, vision_features: torch.Tensor, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """ITM logits `(pairs, 2)` for row-aligned (image, text) pairs: queries and text attend to
        each other (bidirectional), queries to the image; the head's output averaged over queries."""
        query_tokens = self.query_tokens.expand(vision_features.shape[0], -1, -1)
        num_queries = query_tokens.shape[1]
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        mask = torch.cat([torch.ones(mask.shape[0], num_queries, dtype=mask.dtype, device=mask.device), mask], dim=1)
        embeds = self.embeddings(input_ids=input_ids, query_embeds=query_tokens)
        hidden = self.run_qformer(embeds, vision_features, query_length=num_queries,
                                  attention_mask=mask.to(embeds.device))
        return self.itm_head(hidden[:, :num_queries, :].to(self.itm_head.weight.dtype)).mean(dim=1)

    def itm_scores(self, vision_features: torch.Tensor, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Probability that each (image, text) pair matches, `(pairs,)`."""
        return self.itm_logits(vision_features, input_ids, attention_mask).softmax(dim=-1)[:, 1]


class ImageTextModel(ImageTextScoring, PreTrainedModel):
    """BLIP-2 stage 1: frozen vision tower, queries, Q-Former and the image-text heads; no LLM.

    Reads `vlm` checkpoints (their LLM and projection are left out) and official
    `Blip2ForImageTextRetrieval` checkpoints (weights 1:1).
    """

    config_class = VLMConfig
    config: VLMConfig
    supports_gradient_checkpointing = True  # the Q-Former's layers (transformers' BLIP-2 blocks)
    main_input_name = "pixel_values"
    input_modalities = ("image", "text")
    _supports_sdpa = True
    _tied_weights_keys = {"itg_head.decoder.weight": "embeddings.word_embeddings.weight"}
    # A `vlm` checkpoint also holds the LLM and the projection to it: not part of this model.
    _keys_to_ignore_on_load_unexpected = [r"^language_model\.", r"^language_projection\."]

    def __init__(self, config: VLMConfig):
        super().__init__(config)

        if not config.image_text_hidden_size:
            raise ValueError("ImageTextModel needs config.image_text_hidden_size (the ITC/ITM heads' width)")
        self.build_bridge(config, projection=False)  # no LLM, so no projection into one
        add_image_text_parts(self, config)
        self.post_init()
        self.vision_model.requires_grad_(False)

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if module is self:
            nn.init.normal_(self.query_tokens, mean=0.0, std=self.config.initializer_range)
        init_image_text_weights(self, module)

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.embeddings.word_embeddings = value

    def get_output_embeddings(self) -> nn.Module:
        return self.itg_head.decoder

    def forward(self, text_ids: torch.Tensor, text_mask: torch.Tensor, image_ids: torch.Tensor,
                pixel_values: torch.Tensor | None = None, vision_features: torch.Tensor | None = None,
                caption_ids: torch.Tensor | None = None,
                decoder_start_id: int = 0, weights: dict[str, float] | None = None, negatives: str = "sample",
                **kwargs) -> dict[str, torch.Tensor]:
        """BLIP-2's stage-1 losses for a batch of (image, caption) pairs: `loss`, `itc`, `itm`, `itg`.

        `text_ids` / `text_mask`: the captions in the Q-Former's tokenizer; `image_ids`: an integer
        naming each row's image (captions of one image are both positives), `caption_ids` each row's
        caption (equal captions are positives too); `decoder_start_id`: the
        token ITG starts decoding from. See `vlm.stage1_losses`. Under DDP, call it through the
        wrapped model (as `Trainer` does) so that gradients are averaged.
        """
        from .stage1_losses import stage1_losses

        batch = {"text_ids": text_ids, "text_mask": text_mask, "image_ids": image_ids, "caption_ids": caption_ids,
                 "pixel_values": pixel_values, "vision_features": vision_features}
        return stage1_losses(self, batch, decoder_start_id, weights, negatives)


@torch.inference_mode()
def score_pairs(model, tokenizer, pixel_values: torch.Tensor, pairs: list[tuple[int, str]],
                max_length: int = 512) -> list[tuple[float, float]]:
    """`(itc, itm)` for each `(image row of pixel_values, text)` pair, each image and text encoded once.

    `model` is an `ImageTextModel` or a `VisionLanguageModel` with the stage-1 parts; `tokenizer`
    the Q-Former's (`processor.qformer_tokenizer`)."""
    used = sorted({i for i, _ in pairs})
    vision = model.get_vision_features(pixel_values[used])
    row = {image: r for r, image in enumerate(used)}
    texts = list(dict.fromkeys(t for _, t in pairs))
    column = {t: c for c, t in enumerate(texts)}
    device = vision.device
    encoded = tokenizer(texts, padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
    ids, mask = encoded["input_ids"].to(device), encoded["attention_mask"].to(device)
    itc = model.itc_scores(model.image_embeddings(vision_features=vision), model.text_embeddings(ids, mask))
    images = torch.tensor([row[i] for i, _ in pairs], device=device)
    columns = torch.tensor([column[t] for _, t in pairs], device=device)
    itm = model.itm_scores(vision[images], ids[columns], mask[columns])
    return [(float(itc[r, c]), float(p)) for r, c, p in zip(images.tolist(), columns.tolist(), itm.tolist())]
