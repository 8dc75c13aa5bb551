"""BLIP-2 stage 1: parity with transformers' retrieval model, the three losses, learning, processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from transformers import Blip2ForImageTextRetrieval, Blip2Processor

import tiny
from vlm import load_pretrained
from vlm.errors import VLMError
from vlm.cli import main as vlm_main

pytestmark = pytest.mark.usefixtures("one_torch_thread")
REPO = Path(__file__).parent.parent
TEXTS = ["a red circle", "a blue square on a white background", "the quick brown fox", "a cat"]


# -- parity with transformers' Blip2ForImageTextRetrieval ----------------------------------------------
@pytest.fixture(scope="module", params=[dict(width=32, layers=2, image_text_hidden_size=16),
                                        dict(width=64, layers=4, image_text_hidden_size=32, num_query_tokens=6)],
                ids=["small", "wider"])
def retrieval_dir(request, tmp_path_factory):
    return tiny.save_official_retrieval(tmp_path_factory.mktemp("retrieval"), seed=7, **request.param)


def transformers_scores(folder: Path, image: Image.Image, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    model = Blip2ForImageTextRetrieval.from_pretrained(folder).eval()
    processor = Blip2Processor.from_pretrained(folder)
    with torch.no_grad():
        itc = model(**processor(images=image, text=texts, return_tensors="pt", padding=True)).logits_per_image[0]
        itm = torch.stack([model(**processor(images=image, text=t, return_tensors="pt"),
                                 use_image_text_matching_head=True).logits_per_image.softmax(-1)[0, 1] for t in texts])
    return itc, itm


def test_itc_and_itm_equal_transformers_through_the_api_and_vlm_score(retrieval_dir, tmp_path):
    model, processor = load_pretrained(str(retrieval_dir), device="cpu")
    assert type(model).__name__ == "ImageTextModel"
    images = [tiny.random_image(i) for i in range(2)]
    for i, image in enumerate(images):
        image.save(tmp_path / f"{i}.png")
    want = [transformers_scores(retrieval_dir, image, TEXTS) for image in images]
    pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    tokens = processor.qformer_tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        itc = model.itc_scores(model.image_embeddings(pixels), model.text_embeddings(**_ids(tokens)))
        vision = model.get_vision_features(pixels)
        for i, (want_itc, want_itm) in enumerate(want):
            torch.testing.assert_close(itc[i], want_itc, atol=1e-5, rtol=0)
            pairs = vision[i].expand(len(TEXTS), -1, -1)
            torch.testing.assert_close(model.itm_scores(pairs, **_ids(tokens)), want_itm, atol=1e-5, rtol=0)
    out = tmp_path / "scores.jsonl"
    args = [str(tmp_path / "0.png"), str(tmp_path / "1.png"), "--out", str(out), "--model", str(retrieval_dir),
            "--num-workers", "0", "--no-progress", *[a for t in TEXTS for a in ("--text", t)]]
    assert vlm_main(["score", *args]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(Path(r["image"]).name, r["text"]) for r in rows] == [(f"{i}.png", t) for i in range(2) for t in TEXTS]
    for r in rows:
        i, t = int(Path(r["image"]).stem), TEXTS.index(r["text"])
        assert abs(r["itc"] - float(want[i][0][t])) < 1e-5 and abs(r["itm"] - float(want[i][1][t])) < 1e-5


def _ids(tokens) -> dict:
    return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}


def test_score_rows_lists_errors_and_resume(retrieval_dir, tmp_path, capsys):
    tiny.random_image(0).save(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_text("not an image")
    listing = tmp_path / "pairs.jsonl"
    listing.write_text("".join(json.dumps(r) + "\n" for r in [
        {"image": "ok.png", "text": "a cat"}, {"image": "bad.png", "text": "a dog"}, {"image": "ok.png"}]))
    out = tmp_path / "out.csv"
    assert vlm_main(["score", str(listing), "--out", str(out), "--model", str(retrieval_dir),
                     "--num-workers", "0", "--no-progress"]) == 1  # 2 of 3 failed: over the default rate
    rows = out.read_text().splitlines()
    assert rows[0] == "image,text,itc,itm,error,path" and len(rows) == 4
    assert "not an image" in rows[2] and "no text to score" in rows[3]
    assert vlm_main(["score", str(listing), "--out", str(out), "--model", str(retrieval_dir), "--text", "a cow",
                     "--num-workers", "0", "--no-progress", "--max-error-rate", "1"]) == 0
    assert "scored 1, errors 0, skipped 2" in capsys.readouterr().err  # only the new (ok.png, a cow) pair


# -- the losses against direct computations -----------------------------------------------------------
def test_itc_loss_is_symmetric_smoothed_cross_entropy_over_the_best_query():
    from vlm.stage1_losses import LABEL_SMOOTHING, itc_loss

    torch.manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(3, 4, 8), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    temp = torch.tensor(0.07)
    loss, sim_i2t, sim_t2i, positives = itc_loss(image, text, torch.tensor([10, 11, 12]), temp)
    sims = torch.tensor([[max(float(image[i, q] @ text[t]) for q in range(4)) for t in range(3)] for i in range(3)])
    torch.testing.assert_close(sim_i2t, sims / 0.07)
    torch.testing.assert_close(sim_t2i, sims.t() / 0.07)

    def smoothed_ce(logits):
        logp = logits.log_softmax(dim=1)
        target = torch.full_like(logp, LABEL_SMOOTHING / 3) + torch.eye(3) * (1 - LABEL_SMOOTHING)
        return -(target * logp).sum(dim=1).mean()

    torch.testing.assert_close(loss, (smoothed_ce(sims / 0.07) + smoothed_ce(sims.t() / 0.07)) / 2)
    # Two captions of one image: both are that image's positives.
    _, _, _, positives = itc_loss(image, text, torch.tensor([10, 10, 12]), temp)
    assert positives.tolist() == [[True, True, False], [True, True, False], [False, False, True]]
    # Two images with the same caption ("a red circle" in easy-vqa): positives too.
    _, _, _, positives = itc_loss(image, text, torch.tensor([10, 11, 12]), temp, caption_ids=torch.tensor([7, 8, 7]))
    assert positives.tolist() == [[True, False, True], [False, True, False], [True, False, True]]


def test_hard_negatives_are_never_a_positive():
    from vlm.stage1_losses import hard_negatives

    torch.manual_seed(0)
    ids = torch.tensor([0, 0, 1, 2, 3])
    positives = ids[:, None] == ids[None, :]
    sim = torch.randn(5, 5) * 5
    sim[positives] = 100.0  # the positives are by far the most similar
    for _ in range(200):
        drawn = hard_negatives(sim, positives)
        assert not positives[torch.arange(5), drawn].any()
    hardest = hard_negatives(sim, positives, "hardest")
    expected = sim.masked_fill(positives, -1e9).argmax(dim=1)
    assert torch.equal(hardest, expected)


def test_itc_loss_with_non_transitive_positives_equals_the_formula():
    """Row 0 and 1 show one image, rows 1 and 2 share a caption: 0 and 2 are not positives."""
    from vlm.stage1_losses import LABEL_SMOOTHING, itc_loss

    torch.manual_seed(1)
    image = torch.nn.functional.normalize(torch.randn(3, 2, 8), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    loss, sim_i2t, sim_t2i, positives = itc_loss(image, text, torch.tensor([10, 10, 11]), torch.tensor(0.1),
                                                 caption_ids=torch.tensor([7, 8, 8]))
    assert positives.tolist() == [[True, True, False], [True, True, True], [False, True, True]]
    target = positives.float() / positives.sum(dim=1, keepdim=True)
    target = target * (1 - LABEL_SMOOTHING) + LABEL_SMOOTHING / 3

    def soft_ce(logits):
        return -(target * logits.log_softmax(dim=1)).sum(dim=1).mean()

    torch.testing.assert_close(loss, (soft_ce(sim_i2t) + soft_ce(sim_t2i)) / 2)


def test_rows_without_a_negative_leave_itm(stage1_base):
    """A batch of one image's captions: no row has a negative; ITM then trains on the positives."""
    from vlm.stage1_losses import hard_negatives, itm_loss
    from vlm.train.recipes.stage1 import load_image_text_model

    positives = torch.tensor([[True, True, False], [True, True, False], [False, False, True]])
    positives[2, 2] = True
    everything = torch.ones(3, 3, dtype=torch.bool)
    for mode in ("sample", "hardest"):
        assert hard_negatives(torch.randn(3, 3), everything, mode).tolist() == [-1, -1, -1]
        assert (hard_negatives(torch.randn(3, 3), positives, mode) >= 0).all()
    model, processor = load_image_text_model(str(stage1_base), device="cpu", dtype=torch.float32)
    tokens = processor.qformer_tokenizer(["a red circle"] * 3, return_tensors="pt")
    vision = model.get_vision_features(processor.image_processor([tiny.random_image(0)] * 3,
                                                                 return_tensors="pt")["pixel_values"])
    sim = torch.randn(3, 3)
    loss = itm_loss(model, vision, tokens["input_ids"], tokens["attention_mask"], sim, sim, everything)
    logits = model.itm_logits(vision, tokens["input_ids"], tokens["attention_mask"])
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits, torch.ones(3, dtype=torch.long)))


@pytest.mark.parametrize("recipe, overrides", [("stage1", ["stage1.itm=0"]), ("stage1", ["stage1.itg=0"]),
                                               ("stage1", ["gradient_checkpointing=true"]),
                                               ("stage1", ["stage1.train_query_path=false"]),
                                               ("bridge", []), ("lora", [])])
def test_every_trainable_parameter_gets_a_gradient(stage1_base, recipe, overrides):
    """DDP (find_unused_parameters off) fails at the second step on a trainable parameter no loss
    reaches: a head whose objective has weight 0, or the Q-Former's text side in stage 2."""
    from vlm.train.config import load_config
    from vlm.train.recipes import prepare_model
    from vlm.train.stage1_data import Stage1Collator, Stage1Dataset, decoder_start_id, qformer_tokenizer
    from vlm.data import Example
    from vlm.stage1_losses import stage1_losses

    config = load_config(None, [f"recipe={recipe}", f"model={stage1_base}", *overrides])
    model, processor = prepare_model(config, device="cpu")
    images = [tiny.random_image(i) for i in range(3)]
    if recipe == "stage1":
        tokenizer = qformer_tokenizer(processor)
        examples = [Example(task="caption", image=im, caption=t) for im, t in zip(images, TEXTS)]
        batch = Stage1Collator(tokenizer, 32)([Stage1Dataset(examples, processor)[i] for i in range(3)])
        weights = {"itc": config.stage1.itc, "itm": config.stage1.itm, "itg": config.stage1.itg}
        loss = stage1_losses(model, batch, decoder_start_id(tokenizer), weights)["loss"]
    else:
        inputs = processor(images=images, text=[f"<image> {t}" for t in TEXTS[:3]], return_tensors="pt")
        loss = model(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    assert not any(p.requires_grad for p in model.vision_model.parameters())


def compose_stage1_base(root: Path):
    """`(model, processor)` as `vlm build --qformer-init BERT` composes them: CLIP tower, Llama, 4 queries."""
    from vlm.build import compose_model

    (root / "bert").mkdir()
    return compose_model(str(tiny.save_vision_part(root / "vision", "clip")),
                         str(tiny.save_llm_part(root / "llm", "llama", chat=True)),
                         qformer_init=str(tiny.make_bert(root / "bert")), num_query_tokens=4, image_text_hidden_size=16)


@pytest.fixture(scope="module")
def fresh_stage1_base(tmp_path_factory):
    """A `vlm build` output with the stage-1 parts, as it is (BERT's dropout included)."""
    root = tmp_path_factory.mktemp("fresh-stage1")
    model, processor = compose_stage1_base(root)
    model.save_pretrained(root / "built")
    processor.save_pretrained(root / "built")
    return root / "built"


@pytest.fixture(scope="module")
def stage1_base(tmp_path_factory):
    """A `vlm build` output with the stage-1 parts (BERT-initialised text side), dropout off."""
    root = tmp_path_factory.mktemp("stage1-parts")
    model, processor = compose_stage1_base(root)
    model.qformer.config.hidden_dropout_prob = model.qformer.config.attention_probs_dropout_prob = 0.0
    model.config.qformer_config.hidden_dropout_prob = 0.0
    model.config.qformer_config.attention_probs_dropout_prob = 0.0
    model.save_pretrained(root / "built")
    processor.save_pretrained(root / "built")
    return root / "built"


def test_untrained_all_zero_queries_are_drawn_before_training(tmp_path):
    """transformers initialises BLIP-2's query tokens to zero; LayerNorm of that gave ITC an infinite
    gradient norm, which clipping turned into no update at all. The recipe draws them as BLIP-2 does."""
    from safetensors.torch import load_file, save_file

    from vlm.stage1_losses import itc_loss
    from vlm.train.config import load_config
    from vlm.train.recipes import prepare_model

    folder = tiny.save_official_retrieval(tmp_path / "untrained", seed=1)
    weights = load_file(folder / "model.safetensors")
    save_file({**weights, "query_tokens": torch.zeros_like(weights["query_tokens"])}, folder / "model.safetensors",
              metadata={"format": "pt"})
    model, processor = prepare_model(load_config("stage1", [f"model={folder}"]), device="cpu")
    assert model.query_tokens.count_nonzero() == model.query_tokens.numel()
    assert 0.01 < float(model.query_tokens.std()) < 0.03  # N(0, initializer_range)
    pixels = processor.image_processor([tiny.random_image(i) for i in range(3)], return_tensors="pt")["pixel_values"]
    tokens = processor.qformer_tokenizer(TEXTS[:3], padding=True, return_tensors="pt")
    loss, *_ = itc_loss(model.image_embeddings(pixels), model.text_embeddings(**_ids(tokens)), torch.arange(3),
                        model.temp)
    loss.backward()
    assert torch.isfinite(torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None]))


def test_itg_masks_and_loss(stage1_base):
    from vlm.train.recipes.stage1 import load_image_text_model
    from vlm.stage1_losses import IGNORE_INDEX, LABEL_SMOOTHING, itg_loss, itg_mask

    mask = itg_mask(2, torch.tensor([[1, 1, 0]]))[0, 0] == 0  # True: may attend
    assert mask.tolist() == [
        [True, True, False, False, False],  # queries see queries only
        [True, True, False, False, False],
        [True, True, True, False, False],  # text: the queries and itself, causally
        [True, True, True, True, False],
        [True, True, True, True, False],  # padding is seen by nobody (its own row does not matter)
    ]
    model, processor = load_image_text_model(str(stage1_base), device="cpu", dtype=torch.float32)
    model.eval()
    tokens = processor.qformer_tokenizer(["a red circle", "a blue square on white"], padding=True,
                                         return_tensors="pt")
    vision = model.get_vision_features(processor.image_processor([tiny.random_image(0)] * 2,
                                                                 return_tensors="pt")["pixel_values"])
    ids, text_mask = tokens["input_ids"], tokens["attention_mask"]
    loss = itg_loss(model, vision, ids, text_mask, decoder_start_id=5)
    # Direct: the same forward written out, the shifted next-token cross-entropy over real tokens.
    decoder = ids.clone()
    decoder[:, 0] = 5
    queries = model.query_tokens.expand(2, -1, -1)
    embeds = model.embeddings(input_ids=decoder, query_embeds=queries)
    hidden = model.qformer(query_embeds=embeds, query_length=4, attention_mask=itg_mask(4, text_mask),
                           encoder_hidden_states=vision, return_dict=True).last_hidden_state
    logits = model.itg_head(hidden[:, 4:])
    labels = decoder.masked_fill(text_mask == 0, IGNORE_INDEX)[:, 1:]
    want = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                             ignore_index=IGNORE_INDEX, label_smoothing=LABEL_SMOOTHING)
    torch.testing.assert_close(loss, want)
    # Causality: changing a later token changes no earlier prediction; queries never see the text.
    changed = decoder.clone()
    changed[0, 3] = 7
    other = model.qformer(query_embeds=model.embeddings(input_ids=changed, query_embeds=queries), query_length=4,
                          attention_mask=itg_mask(4, text_mask), encoder_hidden_states=vision,
                          return_dict=True).last_hidden_state
    torch.testing.assert_close(other[0, :4 + 3], hidden[0, :4 + 3])
    assert not torch.allclose(other[0, 4 + 3], hidden[0, 4 + 3])


# -- training --------------------------------------------------------------------------------------------
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 60, 220), "yellow": (230, 210, 20)}
SHAPES = ("circle", "square", "triangle")


def shape_picture(colour: str, shape: str, left: bool) -> Image.Image:
    image = Image.new("RGB", (30, 30), "white")
    box = (2, 8, 14, 20) if left else (16, 8, 28, 20)
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse(box, fill=COLOURS[colour])
    elif shape == "square":
        draw.rectangle(box, fill=COLOURS[colour])
    else:
        draw.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill=COLOURS[colour])
    return image


def captioned_pictures(folder: Path) -> Path:
    """24 pictures, each with its own caption: 4 colours x 3 shapes x 2 sides."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for colour in COLOURS:
        for shape in SHAPES:
            for left in (True, False):
                name = f"{colour}-{shape}-{'left' if left else 'right'}.png"
                shape_picture(colour, shape, left).save(folder / name)
                rows.append({"image": name, "text": f"a {colour} {shape} on the {'left' if left else 'right'}"})
    (folder / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder / "captions.jsonl"


def top1(scores: dict, names: list[str], texts: list[str]) -> tuple[float, float]:
    matrix = torch.tensor([[scores[(n, t)] for t in texts] for n in names])
    i2t = (matrix.argmax(dim=1) == torch.arange(len(names))).float().mean()
    t2i = (matrix.argmax(dim=0) == torch.arange(len(texts))).float().mean()
    return float(i2t), float(t2i)


def test_the_demo_ships_the_stage1_weights_its_stage2_did_not_train(stage1_base, tmp_path):
    """Stage 2 leaves the Q-Former's text FFN and the heads out of its bridge (they do not train):
    `ship` takes them from the run's base."""
    from safetensors.torch import load_file

    from vlm.train.demo.ship import stage1_parts

    run = tmp_path / "run"
    run.mkdir()
    (run / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(stage1_base)}))
    parts = stage1_parts(run)
    base = load_file(stage1_base / "model.safetensors")
    text_ffn = {k for k in base if k.startswith("qformer.") and (".intermediate." in k or ".output." in k)
                and "attention" not in k and "_query" not in k}
    assert text_ffn and text_ffn <= set(parts) and {"itm_head.weight", "temp", "text_projection.bias"} <= set(parts)
    assert not {k for k in parts if k.startswith(("language_", "vision_model", "query_tokens"))}
    assert "embeddings.word_embeddings.weight" not in parts
    assert not {k for k in parts if ".attention." in k or "_query." in k or "crossattention" in k}


def test_heads_only_stage1_leaves_what_stage2_runs_and_ships(stage1_base, tmp_path):
    """`stage1.train_query_path: false` fits the heads to a finished bridge: the queries, the
    Q-Former's shared layers and the LLM are as they were, the heads moved; `ship --stage1` takes
    them from that run."""
    from safetensors.torch import load_file, save_file

    from vlm.image_text import is_stage1_weight
    from vlm.train.demo.ship import stage1_parts

    data = captioned_pictures(tmp_path / "pictures")
    out = tmp_path / "heads"
    assert vlm_main(["train", "--recipe", "stage1", "--model", str(stage1_base), "--train-data", str(data),
                     "--output-dir", str(out), "--max-steps", "3", "--batch-size", "8", "--learning-rate", "1e-2",
                     "stage1.train_query_path=false", "report_to=none", "data.num_workers=0",
                     "save_steps=1000"]) == 0
    before, after = load_file(stage1_base / "model.safetensors"), load_file(out / "model.safetensors")
    assert before.keys() == after.keys()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(is_stage1_weight(k) for k in moved), sorted(moved - {k for k in moved if is_stage1_weight(k)})
    assert {"itm_head.weight", "text_projection.weight", "vision_projection.weight",
            "qformer.encoder.layer.0.intermediate.dense.weight"} <= moved
    run = tmp_path / "run"
    run.mkdir()
    save_file({"query_tokens": after["query_tokens"]}, run / "bridge.safetensors")
    parts = stage1_parts(run, heads=out)
    assert torch.equal(parts["itm_head.weight"], after["itm_head.weight"])
    with pytest.raises(VLMError, match="--stage1 .*no model.safetensors"):
        stage1_parts(run, heads=tmp_path)
    save_file({"query_tokens": after["query_tokens"] + 1}, run / "bridge.safetensors")  # another run's bridge
    with pytest.raises(VLMError, match="query_tokens is not"):
        stage1_parts(run, heads=out)


def test_stage1_evaluation_reports_its_loss(stage1_base, tmp_path, capsys):
    data = captioned_pictures(tmp_path / "pictures")
    assert vlm_main(["train", "--recipe", "stage1", "--model", str(stage1_base), "--train-data", str(data),
                     "--eval-data", str(data), "--output-dir", str(tmp_path / "out"), "--max-steps", "1",
                     "--batch-size", "8", "report_to=none", "data.num_workers=0", "save_steps=1000"]) == 0
    reported = [line for line in capsys.readouterr().out.splitlines() if line.startswith("eval loss ")]
    assert reported and 0 < float(reported[-1].split()[-1]) < 20, reported


def itc_top1(model_dir: Path, data: Path) -> tuple[float, float]:
    """Image->text and text->image top-1 over every (picture, caption) pair of `data`, by `vlm score`'s ITC."""
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    names, texts = [r["image"] for r in rows], [r["text"] for r in rows]
    listing = data.parent / "all-pairs.jsonl"
    listing.write_text("".join(json.dumps({"image": str(data.parent / n), "text": t}) + "\n"
                               for n in names for t in texts))
    out = data.parent / f"scores-{model_dir.name}.jsonl"
    assert vlm_main(["score", str(listing), "--out", str(out), "--model", str(model_dir), "--num-workers", "0",
                     "--no-progress", "--overwrite"]) == 0
    scores = {}
    for line in out.read_text().splitlines():
        r = json.loads(line)
        scores[(Path(r["image"]).name, r["text"])] = r["itc"]
    return top1(scores, names, texts)


def test_stage1_learns_retrieval_from_a_fresh_build_with_the_default_settings(fresh_stage1_base, tmp_path, capsys):
    """The shipped preset, nothing tuned, from a `vlm build` output as it is. With BLIP-2's settings
    (lr 1e-4, BERT's dropout, word embeddings trained by ITG) ITC stayed at ln(8) for all 300 steps and
    top-1 at chance (1/24); README (Fine-tune) has the measurements behind the recipe's defaults."""
    from vlm.train.config import load_config

    assert load_config(None, ["recipe=stage1"]).model_dump(include={"learning_rate", "stage1"}) == \
        load_config("stage1").model_dump(include={"learning_rate", "stage1"})  # --recipe stage1: the same
    data = captioned_pictures(tmp_path / "pictures")
    out = tmp_path / "stage1"
    assert vlm_main(["train", "stage1", f"model={fresh_stage1_base}", f"data.train={data}", f"output_dir={out}",
                     "max_steps=300", "batch_size=8", "logging_steps=50", "report_to=none", "data.num_workers=0",
                     "save_steps=1000"]) == 0
    logged = [line for line in capsys.readouterr().out.splitlines() if "'loss_itc'" in line]
    i2t, t2i = itc_top1(out, data)
    print(f"\nstage1 from a fresh build, shipped preset, 300 steps: ITC top-1 {i2t:.2f} / {t2i:.2f} (chance 0.04)\n"
          + "\n".join(logged))
    assert i2t >= 0.25 and t2i >= 0.25, (i2t, t2i, logged)


def test_stage1_learns_retrieval_and_stage2_keeps_its_parts(stage1_base, tmp_path):
    data = captioned_pictures(tmp_path / "pictures")

    def measure(model_dir: Path) -> tuple[float, float]:
        return itc_top1(model_dir, data)

    before = measure(stage1_base)
    assert max(before) < 0.5  # chance is 1/24
    out = tmp_path / "stage1"
    assert vlm_main(["train", "--recipe", "stage1", "--model", str(stage1_base), "--train-data", str(data),
                     "--output-dir", str(out), "--max-steps", "500", "--batch-size", "12", "--learning-rate",
                     "3e-3", "report_to=none", "data.num_workers=0", "logging_steps=100", "warmup=20",
                     "save_steps=1000"]) == 0
    i2t, t2i = measure(out)
    assert i2t >= 0.8 and t2i >= 0.8, (before, (i2t, t2i))
    summary = subprocess.run([sys.executable, "-m", "vlm.cli", "eval", "--model", str(out), "--data", str(data),
                              "--task", "retrieval", "--k-test", "8"], capture_output=True, text=True, timeout=300)
    assert summary.returncode == 0, summary.stderr[-2000:]
    metrics = json.loads(summary.stdout)["metrics"]
    print(f"\nstage1 on 24 pictures, 500 steps: ITC top-1 {i2t:.2f} / {t2i:.2f}; ITM-reranked {metrics}")
    assert metrics["txt_r1"] >= 80 and metrics["img_r1"] >= 80 and metrics["images"] == 24, metrics
    # Stage 2 from the stage-1 output: the LLM is there, and the stage-1 heads are kept as trained.
    bridge = tmp_path / "bridge"
    assert vlm_main(["train", "--recipe", "bridge", "--model", str(out), "--train-data", str(data),
                     "--output-dir", str(bridge), "--max-steps", "2", "report_to=none", "data.num_workers=0"]) == 0
    trained, _ = load_pretrained(str(out), device="cpu")
    after, _ = load_pretrained(str(bridge), device="cpu")
    assert type(after).__name__ == "VisionLanguageModel"
    for name in ("itm_head.weight", "text_projection.weight", "embeddings.word_embeddings.weight", "temp",
                 "qformer.encoder.layer.0.intermediate.dense.weight", "qformer.encoder.layer.1.output.dense.bias"):
        assert torch.equal(after.state_dict()[name], trained.state_dict()[name]), name
    # Two bridge steps move the query path a little (ITC reads it): retrieval stays, rank for rank
    # within one of the 24 items (equality held on some CPUs and failed on others).
    kept = measure(bridge)
    assert kept[0] >= i2t - 1.5 / 24 and kept[1] >= t2i - 1.5 / 24, (kept, (i2t, t2i))


def test_two_processes_equal_one_process(stage1_base, tmp_path):
    """DDP (gloo): ITC over features gathered from both processes, ITM's hardest negatives among them.
    Plain SGD, so that equal gradients mean equal weights (Adam's first steps turn float noise in
    near-zero gradients into full-size steps)."""
    data = captioned_pictures(tmp_path / "pictures")
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    for row in rows[::3]:  # captions of different lengths: each process pads its batch to one width
        row["text"] += " with a thin outline drawn around it"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["--recipe", "stage1", "--model", str(stage1_base), "--train-data", str(data), "--max-steps", "3",
              "--learning-rate", "0.5", "training_args.optim=sgd", "report_to=none", "data.num_workers=0",
              "stage1.hard_negatives=hardest", "save_steps=1000", "warmup=0", "vision_cache_gb=0"]
    single = tmp_path / "single"
    assert vlm_main(["train", *common, "--output-dir", str(single), "--batch-size", "8"]) == 0
    double = tmp_path / "double"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "vlm.cli", "train",
           *common, "--output-dir", str(double), "--batch-size", "4"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = (load_pretrained(str(folder), device="cpu")[0].state_dict() for folder in (single, double))
    start = load_pretrained(str(stage1_base), device="cpu")[0].state_dict()
    trained = [k for k in one if k.split(".")[0] != "language_model" and one[k].is_floating_point()
               and not torch.equal(one[k], start[k])]
    assert {"query_tokens", "temp", "itm_head.weight", "text_projection.weight", "itg_head.dense.weight"} <= set(trained)
    for name in trained:
        torch.testing.assert_close(two[name], one[name], atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def test_retrieval_recall_counts_shared_captions():
    from vlm.train.retrieval import recall_at

    # Text rows x 3 image columns; text 0 is the caption of images 0 and 1, text 1 of image 2.
    scores = torch.tensor([[0.1, 0.9, 0.3], [0.8, 0.2, 0.5]])
    # Text 0 ranks image 1 first: a hit although image 0 has that caption too. Text 1: image 2 second.
    assert recall_at(scores, {0: {0, 1}, 1: {2}}, ks=(1, 2)) == {1: 0.5, 2: 1.0}
