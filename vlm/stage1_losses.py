"""BLIP-2's stage-1 losses (`ImageTextModel.forward`, the `stage1` recipe): no LLM at all.

Three objectives on one batch of (image, caption) pairs, as in LAVIS's `Blip2Qformer`:

- ITC, image-text contrastive: each caption's [CLS] embedding against each image's query
  embeddings, the best query counting (max), divided by a learnable temperature (init 0.07);
  cross-entropy both ways with label smoothing 0.1. Under DDP the features of every process are
  gathered, so each caption is contrasted with the whole global batch (as LAVIS does), and the
  gradients equal those of one process holding the whole batch.
- ITM, image-text matching: for each image a hard negative caption and for each caption a hard
  negative image, drawn from the ITC similarities (softmax weights, never a pair of the same
  image); queries and text attend to each other; the 2-way head on the query outputs, averaged.
- ITG, image-grounded text generation: the caption decoded from the queries (first token
  replaced by a decoder start token); queries see only queries, text sees the queries and the
  text before it; BERT's LM head, tied to the word embeddings, label smoothing 0.1.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

LABEL_SMOOTHING = 0.1
IGNORE_INDEX = -100


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside a multi-process run."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather(tensor: torch.Tensor, keep_local_grad: bool = False) -> torch.Tensor:
    """Every process's rows, in rank order. With `keep_local_grad`, this process's own rows are the
    local tensor itself (gradients flow into them); the others are constants."""
    rank, size = world()
    if size == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(size)]
    dist.all_gather(parts, tensor.detach().contiguous())
    if keep_local_grad:
        parts[rank] = tensor
    return torch.cat(parts, dim=0)


def itc_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, image_ids: torch.Tensor, temp: torch.Tensor,
             caption_ids: torch.Tensor | None = None):
    """(loss, image->text similarity, text->image similarity, positives); the similarities and
    positives are this process's rows against the global batch.

    `image_embeds` (B, queries, D) and `text_embeds` (B, D) are normalised; `image_ids` name the
    image of each row, so two captions of one image are both positives; `caption_ids` name each
    row's caption text, so two images with the same caption are both positives too. Under DDP every process
    computes the loss of the whole global batch, its own rows carrying the gradients, scaled by the
    number of processes: DDP's gradient average then equals the gradient of one process holding the
    whole batch, and no collective runs in the backward pass. The value is the global loss itself
    (only the gradient is scaled), so logs read the same on any number of processes.
    """
    rank, size = world()
    batch = image_embeds.shape[0]
    if size > 1:  # every process sees the whole loss through `temp`: keep its gradient unscaled
        temp = temp / size + temp.detach() * (1 - 1 / size)
    images_all = gather(image_embeds, keep_local_grad=True)
    texts_all = gather(text_embeds, keep_local_grad=True)
    ids_all = gather(image_ids)
    sim_i2t = torch.einsum("iqd,td->itq", images_all, texts_all).max(dim=-1).values / temp
    positives = ids_all[:, None] == ids_all[None, :]
    if caption_ids is not None:
        captions_all = gather(caption_ids)
        positives |= captions_all[:, None] == captions_all[None, :]
    # The row's own pair, shared with any other caption of the same image (one-hot when none).
    # `positives` is symmetric, so the same normalised rows serve both directions.
    targets = positives.float() / positives.sum(dim=1, keepdim=True)
    loss = (F.cross_entropy(sim_i2t, targets, label_smoothing=LABEL_SMOOTHING)
            + F.cross_entropy(sim_i2t.t(), targets, label_smoothing=LABEL_SMOOTHING)) / 2
    if size > 1:  # the gradient times the process count, the value unchanged
        loss = loss + (size - 1) * (loss - loss.detach())
    mine = slice(rank * batch, (rank + 1) * batch)
    return loss, sim_i2t[mine], sim_i2t.t()[mine], positives[mine]


@torch.no_grad()
def hard_negatives(sim: torch.Tensor, positives: torch.Tensor, mode: str = "sample") -> torch.Tensor:
    """For each row, a column that is not one of its positives: drawn with the softmax of `sim`
    as weights ("sample", LAVIS) or the most similar one ("hardest", deterministic). A row whose
    columns are all positives (a batch of one image's captions) gets -1."""
    negatives = ~positives
    weights = torch.softmax(sim.float(), dim=1).masked_fill(positives, 0.0)
    weights = weights + (weights.sum(dim=1, keepdim=True) == 0) * negatives  # softmax mass all on positives
    has_negative = negatives.any(dim=1)
    weights[~has_negative] = 1.0  # any column; the row is dropped below
    chosen = weights.argmax(dim=1) if mode == "hardest" else torch.multinomial(weights, 1).squeeze(1)
    return chosen.masked_fill(~has_negative, -1)


def itm_loss(model, vision_features, text_ids, text_mask, sim_i2t, sim_t2i, positives, mode="sample"):
    """ITM over B positive pairs, B (image, negative text) and B (negative image, text) pairs
    (fewer negatives when some rows have none in the batch)."""
    vision_all, ids_all, mask_all = gather(vision_features), gather(text_ids), gather(text_mask)
    negative_text = hard_negatives(sim_i2t, positives, mode)  # a caption for each image
    negative_image = hard_negatives(sim_t2i, positives, mode)  # an image for each caption
    with_text, with_image = negative_text >= 0, negative_image >= 0
    images = torch.cat([vision_features, vision_features[with_text], vision_all[negative_image[with_image]]])
    texts = torch.cat([text_ids, ids_all[negative_text[with_text]], text_ids[with_image]])
    masks = torch.cat([text_mask, mask_all[negative_text[with_text]], text_mask[with_image]])
    logits = model.itm_logits(images, texts, masks)
    matches = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    matches[: text_ids.shape[0]] = 1
    return F.cross_entropy(logits, matches)


def itg_mask(query_count: int, text_mask: torch.Tensor) -> torch.Tensor:
    """The (B, 1, Q+L, Q+L) additive attention mask of ITG: queries attend to queries; text attends
    to the queries and to itself causally; padding is seen by nobody."""
    batch, length = text_mask.shape
    total = query_count + length
    allowed = torch.zeros(batch, total, total, dtype=torch.bool, device=text_mask.device)
    allowed[:, :query_count, :query_count] = True
    allowed[:, query_count:, :query_count] = True
    causal = torch.tril(torch.ones(length, length, dtype=torch.bool, device=text_mask.device))
    allowed[:, query_count:, query_count:] = causal & text_mask.bool()[:, None, :]
    mask = torch.zeros(batch, 1, total, total, device=text_mask.device)
    return mask.masked_fill(~allowed[:, None], torch.finfo(mask.dtype).min)


def itg_loss(model, vision_features, text_ids, text_mask, decoder_start_id: int):
    """Next-token loss of the caption decoded from the queries (which see the image)."""
    decoder_ids = text_ids.clone()
    decoder_ids[:, 0] = decoder_start_id
    query_tokens = model.query_tokens.expand(text_ids.shape[0], -1, -1)
    queries = query_tokens.shape[1]
    embeds = model.embeddings(input_ids=decoder_ids, query_embeds=query_tokens)
    mask = itg_mask(queries, text_mask).to(embeds.dtype)
    hidden = model.run_qformer(embeds, vision_features, query_length=queries, attention_mask=mask)[:, queries:, :]
    logits = model.itg_head(hidden.to(model.itg_head.decoder.weight.dtype))
    labels = decoder_ids.masked_fill(text_mask == 0, IGNORE_INDEX)[:, 1:]  # the start token is not a target
    total = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                            ignore_index=IGNORE_INDEX, label_smoothing=LABEL_SMOOTHING, reduction="sum")
    return total / global_count(labels != IGNORE_INDEX)


def global_count(mask: torch.Tensor) -> torch.Tensor:
    """The number of True entries over all processes, divided by the process count: a sum over this
    process's tokens divided by it, averaged by DDP, is the mean over the global batch's tokens
    (captions differ in length, so a per-process mean would weigh short ones more)."""
    count = mask.sum().float()
    _, size = world()
    if size > 1:
        dist.all_reduce(count)
        count = count / size
    return count.clamp(min=1.0)


def stage1_losses(model: nn.Module, batch: dict, decoder_start_id: int,
                  weights: dict[str, float] | None = None, negatives: str = "sample") -> dict[str, torch.Tensor]:
    """The three losses and their weighted sum (`loss`) for a batch of (image, caption) pairs.

    `batch`: `pixel_values` or `vision_features`, `text_ids`, `text_mask`, `image_ids`, optionally
    `caption_ids` (equal captions are positives).
    """
    weights = weights or {"itc": 1.0, "itm": 1.0, "itg": 1.0}
    vision = batch.get("vision_features")
    if vision is None:
        vision = model.get_vision_features(batch["pixel_values"])
    text_ids, text_mask, image_ids = batch["text_ids"], batch["text_mask"], batch["image_ids"]
    caption_ids = batch.get("caption_ids")
    with torch.no_grad():
        model.temp.clamp_(0.001, 0.5)  # LAVIS keeps the temperature in this range
    image_embeds = model.image_embeddings(vision_features=vision)
    text_embeds = model.text_embeddings(text_ids, text_mask)
    out = {}
    out["itc"], sim_i2t, sim_t2i, positives = itc_loss(image_embeds, text_embeds, image_ids, model.temp, caption_ids)
    out["itm"] = itm_loss(model, vision, text_ids, text_mask, sim_i2t, sim_t2i, positives, negatives) \
        if weights.get("itm") else torch.zeros((), device=text_ids.device)
    out["itg"] = itg_loss(model, vision, text_ids, text_mask, decoder_start_id) \
        if weights.get("itg") else torch.zeros((), device=text_ids.device)
    out["loss"] = sum(weights.get(name, 0.0) * out[name] for name in ("itc", "itm", "itg"))
    return out
