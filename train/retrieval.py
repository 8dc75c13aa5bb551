"""`vlm eval --task retrieval`: image->text and text->image recall@1/5/10, as LAVIS measures BLIP-2.

Every image and every caption is embedded once; ITC similarities rank all pairs; the top
`k_test` candidates of each query are re-ranked by ITM (score = ITM's match logit + ITC
similarity, LAVIS's `compute_sim_matrix`). A text counts as correct for every image that has
that exact caption, and an image for every caption it has, so duplicate captions are not
misses. Scores are x100, as papers print them.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch

from vlm.data import image_key
from vlm.metrics import K_TEST

# LAVIS's evaluation settings for BLIP-2 retrieval (and K_TEST).
TEXT_MAX_LENGTH = 35


def ground_truth(examples: Sequence) -> tuple[list, list[str], dict[int, set[int]], dict[int, set[int]]]:
    """(distinct images, distinct texts, image -> its text indices, text -> its image indices)."""
    images, image_index = [], {}
    texts, text_index = [], {}
    image_texts: dict[int, set[int]] = defaultdict(set)
    text_images: dict[int, set[int]] = defaultdict(set)
    for example in examples:
        key = image_key(example.image)
        if key not in image_index:
            image_index[key] = len(images)
            images.append(example)
        for caption in example.answers or [example.caption]:
            if caption not in text_index:
                text_index[caption] = len(texts)
                texts.append(caption)
            image_texts[image_index[key]].add(text_index[caption])
            text_images[text_index[caption]].add(image_index[key])
    return images, texts, image_texts, text_images


@torch.inference_mode()
def embed(model, processor, images: list, texts: list[str], batch_size: int):
    """(vision features, normalised image embeddings, text ids, text mask, text embeddings)."""
    from vlm.data import open_example_image

    vision, image_embeds = [], []
    for start in range(0, len(images), batch_size):
        opened = [open_example_image(e) for e in images[start:start + batch_size]]
        pixels = processor.image_processor(opened, return_tensors="pt")["pixel_values"]
        features = model.get_vision_features(pixels)
        vision.append(features)
        image_embeds.append(model.image_embeddings(vision_features=features))
    device = vision[0].device
    tokens = processor.qformer_tokenizer(texts, padding="longest", truncation=True, max_length=TEXT_MAX_LENGTH,
                                         return_tensors="pt")
    ids, mask = tokens["input_ids"].to(device), tokens["attention_mask"].to(device)
    text_embeds = torch.cat([model.text_embeddings(ids[s:s + batch_size], mask[s:s + batch_size])
                             for s in range(0, len(texts), batch_size)])
    return torch.cat(vision), torch.cat(image_embeds), ids, mask, text_embeds


@torch.inference_mode()
def rerank(model, similarity: torch.Tensor, vision, ids, mask, k: int, batch_size: int, images_are_rows: bool):
    """Scores (rows x columns): ITC top-k of each row re-scored by ITM logit + ITC, the rest -100."""
    scores = torch.full_like(similarity, -100.0)
    k = min(k, similarity.shape[1])
    for row in range(similarity.shape[0]):
        top_sim, top = similarity[row].topk(k)
        logits = []
        for s in range(0, k, batch_size):
            columns = top[s:s + batch_size]
            if images_are_rows:
                image, text = vision[row].expand(len(columns), -1, -1), columns
            else:
                image, text = vision[columns], torch.full_like(columns, row)
            logits.append(model.itm_logits(image, ids[text], mask[text])[:, 1].float())
        scores[row, top] = torch.cat(logits) + top_sim.float()
    return scores


def recall_at(scores: torch.Tensor, truth: dict[int, set[int]], ks=(1, 5, 10)) -> dict[int, float]:
    """Fraction of rows whose best-ranked correct column is within the top k, for each k."""
    order = scores.argsort(dim=1, descending=True)
    ranks = []
    for row in range(scores.shape[0]):
        positions = torch.isin(order[row], torch.tensor(sorted(truth[row]), device=order.device)).nonzero()
        ranks.append(int(positions[0]))
    return {k: sum(r < k for r in ranks) / len(ranks) for k in ks}


def retrieval_metrics(model, processor, examples: Sequence, k_test: int = K_TEST, batch_size: int = 32) -> dict:
    """Recall@1/5/10 both ways (x100) and their mean, LAVIS's protocol (see module doc)."""
    images, texts, image_texts, text_images = ground_truth(examples)
    vision, image_embeds, ids, mask, text_embeds = embed(model, processor, images, texts, batch_size)
    similarity = model.itc_scores(image_embeds, text_embeds).float()  # (images, texts)
    i2t = rerank(model, similarity, vision, ids, mask, k_test, batch_size, images_are_rows=True)
    t2i = rerank(model, similarity.t().contiguous(), vision, ids, mask, k_test, batch_size, images_are_rows=False)
    text_recall = recall_at(i2t, image_texts)
    image_recall = recall_at(t2i, text_images)
    metrics = {f"txt_r{k}": 100 * v for k, v in text_recall.items()}
    metrics |= {f"img_r{k}": 100 * v for k, v in image_recall.items()}
    metrics["r_mean"] = sum(metrics.values()) / len(metrics)
    metrics["images"], metrics["texts"] = len(images), len(texts)
    return metrics
