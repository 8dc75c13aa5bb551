"""The `align` recipe's loss: BLIP-2's stage 1 in miniature, for a bridge that starts from scratch.

A model composed by `vlm build` has a random Q-Former cross-attention, random queries and a random
projection. Trained only through the LLM (stage 2), such a bridge learns what the vision features
say loudly but is slow on the rest: on easy-vqa, after 1,000 steps shapes were all right but
colours only 72%, while the same Q-Former scored directly by a classifier gets colour 99% right in
100 steps. BLIP-2 trains its Q-Former on image-text objectives without the LLM first for this
reason. `align` is the cheap part of that: the loss asks the soft prompt (the projected query
outputs, which enter the LLM where word embeddings do) to hold the caption's words.

Each query is read as a distribution over the LLM's vocabulary by its distance to the word
embeddings, `softmax(-|query - embedding|^2)`. A distance, not a dot product: a dot product
rewards a query for growing along a word's direction (on the demo the soft prompt's norm went from
4.8 to 22, 7x a word embedding's, in 100 steps; by distance it was 12 after 500), and a soft prompt
far longer than the words around it swamps the LLM in the next stage. The queries' distributions
are pooled as a mixture, so each caption word must be likely under some query (a bag of words,
order ignored). No LLM layer runs: a step costs the Q-Former and one matrix product, and the next
stage (`bridge` or `lora`) starts from soft prompts that already name the caption's words in the
LLM's own vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from .collate import IGNORE_INDEX


def bag_of_words_loss(model, inputs: dict, ignore_ids: Iterable[int] = ()) -> torch.Tensor:
    """Mean negative log-likelihood of each caption token under its image's pooled soft prompt.

    `model` is the bare `VisionLanguageModel`; `inputs` a training batch (the caption tokens are
    the `labels` that are not IGNORE_INDEX); `ignore_ids` are tokens that are not words of the
    caption (end-of-turn, padding), left out of the targets.
    """
    soft_prompt = model.get_image_features(
        pixel_values=inputs.get("pixel_values"),
        vision_features=inputs.get("vision_features"),
        qformer_input_ids=inputs.get("qformer_input_ids"),
        qformer_attention_mask=inputs.get("qformer_attention_mask"),
    )  # (images, queries, llm width)
    embeddings = model.get_input_embeddings().weight.float()
    # -|q - e|^2 up to -|q|^2, which is the same for every word of a query and cancels in the softmax
    word_logits = 2 * soft_prompt.float() @ embeddings.T - embeddings.pow(2).sum(-1)  # (images, queries, vocab)
    num_queries = word_logits.shape[1]
    # log of the mixture (1/Q) sum_q p_q(word)
    log_probs = torch.logsumexp(word_logits.log_softmax(-1), dim=1) - math.log(num_queries)
    labels = inputs["labels"].to(log_probs.device)
    targets = labels != IGNORE_INDEX
    for token_id in ignore_ids:
        targets &= labels != token_id
    if labels.shape[0] != log_probs.shape[0]:
        raise ValueError(f"align: {labels.shape[0]} rows but {log_probs.shape[0]} images (one image per row expected)")
    if not targets.any():
        raise ValueError("align: the batch holds no caption tokens to learn (are these caption rows?)")
    token_log_probs = log_probs.gather(1, labels.clamp(min=0))
    return -(token_log_probs * targets).sum() / targets.sum()
