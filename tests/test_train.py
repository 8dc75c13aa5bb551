"""`vlm train` / `vlm export`: each recipe overfits 4 image-caption pairs; LoRA reload/merge/export.

The base is a tiny real model whose LLM first learned the four captions as plain text (like a
pretrained LLM knows language): the bridge recipe then only has to learn which caption an image
asks for, as BLIP-2 stage 2 does. Training runs through the real CLI on a real JSONL file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import tiny
from train_data import CAPTIONS, shape_image, write_caption_data
from vlm import VisionLanguageModel, VLMProcessor, load_pretrained
from vlm.cli import main as vlm_main

RECIPE_ARGS = {
    "bridge": ["--learning-rate", "1e-2"],
    "lora": ["--learning-rate", "1e-2", "lora.r=8", "lora.alpha=16", "lora.dropout=0.0"],
    "qlora": ["--learning-rate", "1e-2", "lora.r=8", "lora.alpha=16", "lora.dropout=0.0"],
    "full": ["--learning-rate", "3e-3", "unfreeze=[language_model,language_projection]"],
}


def pretrain_llm_on_captions(model_dir: Path, captions: list[str], steps: int = 40) -> None:
    """Teach the tiny LLM the captions as text, so it 'knows the language' before stage 2."""
    model = VisionLanguageModel.from_pretrained(model_dir)
    tok = VLMProcessor.from_pretrained(model_dir).tokenizer
    rows = [tok(c)["input_ids"] + [tok.eos_token_id] for c in captions]
    width = max(map(len, rows))
    ids = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows])
    mask = (torch.arange(width)[None] < torch.tensor([len(r) for r in rows])[:, None]).long()
    labels = ids.masked_fill(mask == 0, -100)
    llm = model.language_model.requires_grad_(True)
    optimizer = torch.optim.Adam(llm.parameters(), 1e-2)
    torch.manual_seed(0)
    for _ in range(steps):
        loss = llm(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.5  # the first word is a 1-in-4 guess without the image: ln(4) / tokens
    model.save_pretrained(model_dir)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    # Widths are multiples of 64 so that the 4-bit (QLoRA) CPU kernels accept the LLM layers.
    path = tiny.save_tiny_vlm(tmp_path_factory.mktemp("train-base"), width=64, num_query_tokens=4)
    pretrain_llm_on_captions(path, CAPTIONS)
    return path


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    return write_caption_data(tmp_path_factory.mktemp("train-data"))


@pytest.fixture(scope="module")
def runs(base_dir, data_file, tmp_path_factory):
    """recipe -> output folder, each trained once per module through `vlm train`."""
    done: dict[str, Path] = {}

    def run(recipe: str) -> Path:
        if recipe not in done:
            out = tmp_path_factory.mktemp(f"run-{recipe}")
            argv = [
                "train", "--recipe", recipe, "--model", str(base_dir), "--train-data", str(data_file),
                "--output-dir", str(out), "--max-steps", "40", "--batch-size", "4",
                "warmup=0", "lr_scheduler=constant", "logging_steps=100", "save_steps=1000",
                "report_to=none", "data.num_workers=0", *RECIPE_ARGS[recipe],
            ]
            assert vlm_main(argv) == 0
            done[recipe] = out
        return done[recipe]

    return run


def greedy_captions(model, processor, n: int = 4) -> list[str]:
    images = [shape_image(i) for i in range(n)]
    enc = processor(images=images, text=[processor.caption_prompt] * n)
    out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    return processor.decode_generated(out, enc["input_ids"])


@pytest.mark.parametrize("recipe", ["bridge", "lora", "qlora", "full"])
def test_recipe_overfits_four_pairs(recipe, runs, base_dir):
    base, processor = load_pretrained(str(base_dir), device="cpu")
    assert greedy_captions(base, processor) != CAPTIONS  # the images are not told apart before training
    out = runs(recipe)
    model, processor = load_pretrained(str(out), device="cpu")
    assert greedy_captions(model, processor) == CAPTIONS
    if recipe in ("lora", "qlora"):
        assert (out / "adapter_config.json").is_file() and (out / "bridge.safetensors").is_file()
        assert not (out / "config.json").exists()  # the base is referenced, not copied
    else:
        assert (out / "config.json").is_file() and not (out / "adapter_config.json").exists()
    assert (out / "train_config.yaml").is_file()


def test_qlora_trains_a_4bit_llm(runs, base_dir):
    """The qlora recipe really quantizes the LLM (and only it) and the result decodes in 4-bit too."""
    import bitsandbytes as bnb

    from vlm.train.config import from_dict
    from vlm.train.recipes import prepare_model

    model, _ = prepare_model(from_dict({"recipe": "qlora", "model": str(base_dir)}), device="cpu")
    quantized = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantized and all(".language_model." in n for n in quantized)
    lora = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
    assert lora and all(".language_model." in n for n in lora)
    model4, processor = load_pretrained(str(runs("qlora")), device="cpu", quantization="4bit")
    assert greedy_captions(model4, processor) == CAPTIONS


def test_lora_save_reload_merge_export_same_outputs(runs, tmp_path):
    out = runs("lora")
    model, processor = load_pretrained(str(out), device="cpu")
    enc = processor(images=[shape_image(i) for i in range(4)], text=[""] * 4)
    with torch.no_grad():
        adapter_logits = model(**enc).logits
        merged = model.merge_and_unload()
        merged_logits = merged(**enc).logits
    torch.testing.assert_close(merged_logits, adapter_logits, atol=1e-4, rtol=1e-4)

    exported = tmp_path / "exported"
    assert vlm_main(["export", str(out), "--merge-lora", "--output-dir", str(exported)]) == 0
    standalone, processor2 = load_pretrained(str(exported), device="cpu")
    assert type(standalone) is VisionLanguageModel  # no peft wrapper left
    with torch.no_grad():
        torch.testing.assert_close(standalone(**enc).logits, adapter_logits, atol=1e-4, rtol=1e-4)
    assert greedy_captions(standalone, processor2) == CAPTIONS


def test_engine_runs_text_only_requests_on_the_base_llm(runs):
    """With an unmerged LoRA, requests without images get the base LLM's answers (the adapter off),
    requests with images the adapter's: alone, in one `generate` batch and decoded together."""
    from vlm.engine import GenerationSettings, InferenceEngine, Request

    model, processor = load_pretrained(str(runs("lora")), device="cpu")
    settings = GenerationSettings(max_new_tokens=8)
    texts = [Request(prompt, [], settings) for prompt in ("", "the", "hello", "x y z")]
    images = [Request(processor.caption_prompt, [shape_image(i)], settings) for i in range(4)]

    def alone(requests, adapter: bool) -> list[str]:
        engine = InferenceEngine(model, processor, adapter_for_text=True)
        if adapter:
            return [engine.generate([r])[0].text for r in requests]
        with model.disable_adapter():
            return [engine.generate([r])[0].text for r in requests]

    base, tuned = alone(texts, adapter=False), alone(texts, adapter=True)
    assert base != tuned  # the LoRA changes text answers: what is routed matters
    assert alone(images, adapter=True) == CAPTIONS
    mixed = [texts[0], images[0], texts[1], images[1], texts[2], images[2], texts[3], images[3]]
    expected = [answer for pair in zip(base, CAPTIONS) for answer in pair]
    engine = InferenceEngine(model, processor, max_batch_size=8)
    try:
        assert [c.text for c in engine.generate(mixed)] == expected
        streams = [engine.submit(r) for r in mixed]  # one running batch of both kinds
        assert [s.result().text.strip() for s in streams] == expected
        assert engine.stats["peak_batch"] > 1
    finally:
        engine.close()
    everything = InferenceEngine(model, processor, adapter_for_text=True)  # --adapter-for-text
    assert [c.text for c in everything.generate(mixed)] == [a for pair in zip(tuned, CAPTIONS) for a in pair]


def test_lora_output_as_the_model_trains_its_adapter_on(runs, data_file, tmp_path, capsys):
    """`model:` a LoRA output continues its adapter (a second stage), r and alpha checked."""
    from safetensors.torch import load_file

    first = runs("lora")
    out = tmp_path / "second"
    argv = ["train", "--recipe", "lora", "--model", str(first), "--train-data", str(data_file),
            "--output-dir", str(out), "--max-steps", "3", "--batch-size", "4", "warmup=0", "report_to=none",
            "data.num_workers=0", "--learning-rate", "1e-2", "lora.r=8", "lora.alpha=16"]
    assert vlm_main(argv) == 0
    before, after = (load_file(d / "adapter_model.safetensors") for d in (first, out))
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it trained on
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == json.loads((first / "adapter_config.json").read_text())[
        "base_model_name_or_path"]  # the first stage's base, not the first stage's folder
    model, processor = load_pretrained(str(out), device="cpu")
    assert greedy_captions(model, processor) == CAPTIONS
    assert vlm_main([*argv[:-2], "lora.r=4", "lora.alpha=16", "--output-dir", str(tmp_path / "x")]) == 1
    assert "lora.r: 4, but the adapter of" in capsys.readouterr().err


def test_export_without_merge_flag_is_an_error(runs, tmp_path, capsys):
    assert vlm_main(["export", str(runs("lora")), "--output-dir", str(tmp_path / "x")]) == 1
    assert "--merge-lora" in capsys.readouterr().err


def test_export_blip2_loads_in_plain_transformers(runs, tmp_path):
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    out = tmp_path / "blip2"
    assert vlm_main(["export", str(runs("lora")), "--merge-lora", "--format", "blip2", "--output-dir", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["model_type"] == "blip-2"
    model = Blip2ForConditionalGeneration.from_pretrained(out).eval()
    processor = Blip2Processor.from_pretrained(out)
    enc = processor(images=[shape_image(i) for i in range(4)], text=[""] * 4, return_tensors="pt", padding=True)
    generated = model.generate(**enc, max_new_tokens=12, do_sample=False)
    texts = [t.strip() for t in processor.batch_decode(generated[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)]
    assert texts == CAPTIONS


def test_prompt_template_saved_with_the_output(base_dir, data_file, tmp_path):
    """A VQA-style template set in the config is what the output's processor uses."""
    out = tmp_path / "out"
    argv = [
        "train", "--recipe", "bridge", "--model", str(base_dir), "--train-data", str(data_file),
        "--output-dir", str(out), "--max-steps", "1", "--batch-size", "2", "report_to=none",
        "data.num_workers=0", "prompt.caption_prompt=a picture of", "prompt.question_template=Q: {} A:",
    ]
    assert vlm_main(argv) == 0
    processor = VLMProcessor.from_pretrained(out)
    assert processor.caption_prompt == "a picture of"
    assert processor.format_question("why?") == "Q: why? A:"


def test_lora_targets_only_the_llm(base_dir):
    from vlm.train.config import from_dict
    from vlm.train.recipes import prepare_model

    model, _ = prepare_model(from_dict({"recipe": "lora", "model": str(base_dir),
                                        "lora": {"target_modules": ["q_proj", "down_proj"]}}), device="cpu")
    wrapped = {n.split(".lora_A")[0] for n, _ in model.named_parameters() if "lora_A" in n}
    assert wrapped and all(".language_model." in n for n in wrapped)
    assert {n.rsplit(".", 1)[-1] for n in wrapped} == {"q_proj", "down_proj"}
    trainable = {n.split(".")[2] for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n}
    assert trainable == {"query_tokens", "qformer", "language_projection"}


@pytest.mark.parametrize(
    "extra, message",
    [
        (["lora.target_modules=[qkv_proj]"], "lora.target_modules: qkv_proj match no Linear layer"),
        (["lora.rank=8"], "unknown config key 'lora.rank'; known keys: r, alpha"),
        (["lora.r=eight"], "lora.r must be an integer, got 'eight'"),
        (["precision=fp8"], "precision must be one of"),
        (["batch_size=0"], "batch_size must be greater than or equal to 1, got 0"),
        (["lr_scheduler=cosin"], "lr_scheduler must be one of linear, cosine,"),
        (["stage1.max_text_length=1000"], "stage1.max_text_length must be less than or equal to 512"),
        (["vision_cache_gb=-1"], "vision_cache_gb must be greater than or equal to 0, got -1"),
        (["unfreeze=[vision]", "--recipe", "full"], "unfreeze: vision name no parameters"),
        (["prompt.question_template=no slot"], "prompt.question_template must hold exactly one {}"),
        (["nonsense"], "nonsense: no such config file"),
    ],
)
def test_bad_config_gives_one_line_error(extra, message, base_dir, data_file, tmp_path, capsys):
    argv = ["train", "--recipe", "lora", "--model", str(base_dir), "--train-data", str(data_file),
            "--output-dir", str(tmp_path / "o"), "--max-steps", "1", "report_to=none", *extra]
    assert vlm_main(argv) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]  # above it: load progress bars
    assert last.startswith("error: ") and message in last
    assert not (tmp_path / "o" / "checkpoint-1").exists()


def test_bad_yaml_key_names_the_file(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("recipe: lora\ndata:\n  trian: x.jsonl\n")
    assert vlm_main(["train", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert str(cfg) in err and "'data.trian'" in err and "did you mean data.train" in err


def test_missing_image_in_data_fails_before_training(base_dir, tmp_path, capsys):
    data = write_caption_data(tmp_path / "d")
    (tmp_path / "d" / "img2.png").unlink()
    argv = ["train", "--model", str(base_dir), "--train-data", str(data), "--output-dir", str(tmp_path / "o"),
            "report_to=none"]
    assert vlm_main(argv) == 1
    err = capsys.readouterr().err
    assert "img2.png" in err and "captions.jsonl" in err


def test_recipe_configs_parse():
    from vlm.train.config import load_config

    root = Path(__file__).parent.parent / "configs" / "train"
    for recipe in ("bridge", "lora", "qlora", "full"):
        assert load_config(str(root / f"{recipe}.yaml")).recipe == recipe
    assert load_config(str(root / "demo-easyvqa-align.yaml")).recipe == "align"
    heads = load_config(str(root / "demo-easyvqa-heads.yaml"))
    assert heads.recipe == "stage1" and not heads.stage1.train_query_path
    second, compare = (load_config(str(root / f"{name}.yaml")) for name in ("demo-easyvqa", "demo-easyvqa-compare"))
    # The third stage continues the second's adapter: its model is that output, with the same r/alpha.
    assert compare.recipe == "lora" and compare.model == second.output_dir
    assert (compare.lora.r, compare.lora.alpha) == (second.lora.r, second.lora.alpha)
    assert heads.model == "runs/demo-easyvqa-merged"


def test_scheduler_kwargs_reach_the_schedule(tmp_path):
    """The demo recipe's warmup_stable_decay: warm-up, a flat LR until 400, a cool-down to 0 at 600."""
    from transformers import Trainer

    from vlm.train.config import load_config
    from vlm.train.trainer import training_arguments

    config = load_config(str(Path(__file__).parent.parent / "configs/train/demo-easyvqa.yaml"),
                         [f"output_dir={tmp_path}", "report_to=none"])
    assert config.lr_scheduler_kwargs == {"num_decay_steps": 200}
    trainer = Trainer(model=torch.nn.Linear(2, 2), args=training_arguments(config, has_eval=False))
    trainer.create_optimizer_and_scheduler(num_training_steps=config.max_steps)
    lrs = []
    for _ in range(config.max_steps):
        lrs.append(trainer.lr_scheduler.get_last_lr()[0])
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    assert lrs[0] == 0 and lrs[15] == pytest.approx(2.5e-4)  # linear warm-up over 30 steps
    assert config.max_steps == 600
    assert lrs[30] == lrs[399] == pytest.approx(5e-4)
    assert lrs[500] == pytest.approx(2.5e-4, rel=0.02) and lrs[-1] < 1e-6  # cosine over the last 200


def test_train_help_explains(capsys):
    with pytest.raises(SystemExit) as e:
        vlm_main(["train", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for word in ("--recipe", "qlora", "accelerate launch", "--resume", "key=value"):
        assert word in out


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))


# -- collation: prompts as inference renders them, loss only on targets ---------------------------
def _loss_text(processor, sample) -> str:
    ids = [t for t, label in zip(sample["input_ids"], sample["labels"]) if label != -100]
    assert ids == [label for label in sample["labels"] if label != -100]  # labels are the tokens themselves
    return processor.tokenizer.decode(ids)


def test_collate_caption_vqa_chat_labels(tiny_vlm_dir):
    from vlm.train.collate import encode_example, make_collator
    from vlm.data import Example

    processor = VLMProcessor.from_pretrained(tiny_vlm_dir)
    processor.caption_prompt = "a photo of"
    processor.question_template = "Question: {} Short answer:"
    image = shape_image(0)
    eos = processor.tokenizer.eos_token

    cap = encode_example(Example(task="caption", image=None, caption="a red circle"), processor, image, 512)
    prompt_ids = processor(images=[image], text="a photo of")["input_ids"][0].tolist()
    assert cap["input_ids"][: len(prompt_ids)] == prompt_ids  # the prompt exactly as inference encodes it
    assert set(cap["labels"][: len(prompt_ids)]) == {-100}
    assert _loss_text(processor, cap) == f" a red circle{eos}"

    vqa = encode_example(Example(task="vqa", image=None, question="what colour?", answers=["red", "red", "blue"]),
                         processor, image, 512)
    assert _loss_text(processor, vqa) == f" red{eos}"

    conversation = [
        {"role": "user", "content": "<image>\ndescribe the image."},
        {"role": "assistant", "content": "a small yellow rectangle."},
        {"role": "user", "content": "what colour is the shape?"},
        {"role": "assistant", "content": "red."},
    ]
    chat = encode_example(Example(task="chat", image=None, conversation=conversation), processor, image, 512)
    loss_text = _loss_text(processor, chat)
    assert "a small yellow rectangle.<|im_end|>" in loss_text and "red.<|im_end|>" in loss_text
    assert "describe" not in loss_text and "what colour" not in loss_text and "user" not in loss_text
    assert chat["input_ids"].count(processor.image_token_id) == processor.num_query_tokens

    batch = make_collator(processor)([cap, vqa])
    n_cap, n_vqa = len(cap["input_ids"]), len(vqa["input_ids"])
    assert batch["input_ids"].shape == (2, max(n_cap, n_vqa)) and batch["pixel_values"].shape[0] == 2
    short = 0 if n_cap < n_vqa else 1
    n_short = min(n_cap, n_vqa)
    # Right padding: real tokens keep positions 0..n-1; pads are masked and carry no loss.
    assert batch["attention_mask"][short, :n_short].all() and not batch["attention_mask"][short, n_short:].any()
    assert (batch["labels"][short, n_short:] == -100).all()


def test_trainer_loss_runs_the_lm_head_only_on_targets(tiny_vlm_dir, tmp_path):
    """VLMTrainer's loss and gradients equal Trainer's full-logits ones; lm_head sees fewer positions."""
    from transformers import Trainer, TrainingArguments

    from vlm.train.collate import encode_example, make_collator
    from vlm.train.trainer import VLMTrainer
    from vlm.data import Example

    model, processor = load_pretrained(str(tiny_vlm_dir), device="cpu")
    examples = [Example(task="caption", image=None, caption="a red circle"),
                Example(task="vqa", image=None, question="what colour is the big shape?", answers=["blue"]),
                Example(task="chat", image=None, conversation=[{"role": "user", "content": "hi"},
                                                               {"role": "assistant", "content": "hello there"}])]
    samples = [encode_example(e, processor, shape_image(i) if e.task != "chat" else None, 512)
               for i, e in enumerate(examples)]
    batch = make_collator(processor)(samples)
    trainer = VLMTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True))
    widths = []
    model.language_model.lm_head.register_forward_hook(lambda m, args, out: widths.append(args[0].shape[1]))
    items = (batch["labels"] != -100).sum()

    def loss_and_grads(compute_loss):
        model.zero_grad()
        loss = compute_loss(trainer, model, dict(batch), num_items_in_batch=items)
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    ours, ours_grads = loss_and_grads(VLMTrainer.compute_loss)
    ref, ref_grads = loss_and_grads(Trainer.compute_loss)
    assert widths[0] < widths[1] == batch["input_ids"].shape[1]
    assert ours == pytest.approx(ref, rel=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(ours_grads, ref_grads))


def test_collate_truncation_keeps_image_tokens_or_fails(tiny_vlm_dir):
    from vlm.train.collate import encode_example
    from vlm.data import Example
    from vlm.errors import VLMError

    processor = VLMProcessor.from_pretrained(tiny_vlm_dir)
    example = Example(task="caption", image=None, caption="the quick brown fox jumps over the lazy dog", source="d.jsonl:3")
    sample = encode_example(example, processor, shape_image(0), 8)
    assert len(sample["input_ids"]) == 8
    with pytest.raises(VLMError, match=r"d.jsonl:3: .*data.max_length=3"):
        encode_example(example, processor, shape_image(0), 3)


# -- text-only rows, image markers in any turn ----------------------------------------------------
def write_llava_data(folder: Path, rows: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(2):
        shape_image(i).save(folder / f"img{i}.png")
    path = folder / "llava.json"
    path.write_text(json.dumps(rows))
    return path


LLAVA_ROWS = [
    {"id": "text", "conversations": [{"from": "human", "value": "say red"}, {"from": "gpt", "value": "red"}]},
    {"id": "first", "image": "img0.png", "conversations": [
        {"from": "human", "value": "<image>\nwhat is it?"}, {"from": "gpt", "value": "red circle"}]},
    # The image arrives in the second user turn (after an assistant turn).
    {"id": "later", "image": "img1.png", "conversations": [
        {"from": "human", "value": "hello"}, {"from": "gpt", "value": "hi"},
        {"from": "human", "value": "<image>\nand this?"}, {"from": "gpt", "value": "blue square"}]},
]


def test_llava_text_only_and_image_rows_train(base_dir, tmp_path):
    """A batch mixing a text-only row and image rows (one with its image in a later turn) trains."""
    data = write_llava_data(tmp_path / "d", LLAVA_ROWS)
    out = tmp_path / "o"
    argv = ["train", "--recipe", "lora", "--model", str(base_dir), "--train-data", str(data), "--output-dir", str(out),
            "--max-steps", "2", "--batch-size", "3", "report_to=none", "data.num_workers=1", "lora.r=4"]
    assert vlm_main(argv) == 0
    results = json.loads((out / "train_results.json").read_text())
    assert results["train_loss"] == results["train_loss"]  # not NaN
    model, processor = load_pretrained(str(out), device="cpu")  # the output loads and answers text-only
    enc = processor(text=processor.format_chat([{"role": "user", "content": "say red"}]))
    assert model.generate(**enc, max_new_tokens=2, do_sample=False).shape[1] > enc["input_ids"].shape[1]


def test_image_marker_in_a_later_turn_expands(tiny_vlm_dir):
    from vlm.train.collate import TrainDataset, make_collator
    from vlm.data import load_examples

    processor = VLMProcessor.from_pretrained(tiny_vlm_dir)
    n = processor.num_query_tokens
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        examples = load_examples(str(write_llava_data(Path(d), LLAVA_ROWS)))
        dataset = TrainDataset(examples, processor)
        samples = [dataset[i] for i in range(3)]
    text, first, later = samples
    assert "pixel_values" not in text and text["input_ids"].count(processor.image_token_id) == 0
    for sample in (first, later):
        ids = sample["input_ids"]
        assert ids.count(processor.image_token_id) == n and sample["pixel_values"].shape[0] == 1
        start = ids.index(processor.image_token_id)
        assert ids[start : start + n] == [processor.image_token_id] * n  # one contiguous block
        assert all(sample["labels"][i] == -100 for i in range(start, start + n))
    # The image tokens of the later-turn row come after its first assistant answer ("hi").
    hi = processor.tokenizer("hi", add_special_tokens=False)["input_ids"]
    labelled = [t for t in later["labels"] if t != -100]
    assert labelled[: len(hi)] == hi and later["input_ids"].index(processor.image_token_id) > later["labels"].index(hi[0])
    assert "blue square" in processor.tokenizer.decode(labelled)

    batch = make_collator(processor)([text, first, later])
    assert batch["pixel_values"].shape[0] == 2  # only the samples with an image, in order
    assert torch.equal(batch["pixel_values"][0], first["pixel_values"][0])
    assert torch.equal(batch["pixel_values"][1], later["pixel_values"][0])
    assert "pixel_values" not in make_collator(processor)([text])


@pytest.mark.parametrize(
    "row, message",
    [
        ({"conversations": [{"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": "x"}]},
         "llava.json:2: text-only example holds 1 <image> marker(s) but no image"),
        ({"image": "img0.png", "conversations": [{"from": "human", "value": "<image> a"}, {"from": "gpt", "value": "x"},
                                                 {"from": "human", "value": "<image> b"}, {"from": "gpt", "value": "y"}]},
         "llava.json:2: holds 2 <image> markers for one image"),
    ],
)
def test_rows_whose_markers_do_not_fit_fail_before_training(row, message, base_dir, tmp_path, capsys):
    data = write_llava_data(tmp_path / "d", [LLAVA_ROWS[1], row])
    argv = ["train", "--model", str(base_dir), "--train-data", str(data), "--output-dir", str(tmp_path / "o"),
            "--max-steps", "1", "report_to=none", "data.num_workers=0"]
    assert vlm_main(argv) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last
    assert not (tmp_path / "o" / "checkpoint-1").exists()


# -- the output folder is never half-written --------------------------------------------------------
def test_failed_output_save_leaves_no_loadable_half_folder(base_dir, tmp_path):
    """A failure after the adapter is written (here: the config cannot be dumped) leaves no model behind."""
    import yaml

    from vlm.train.config import from_dict
    from vlm.train.recipes import prepare_model
    from vlm.train.save import save_trained

    config = from_dict({"recipe": "lora", "model": str(base_dir), "lora": {"r": 4}})
    model, processor = prepare_model(config, device="cpu")
    out = tmp_path / "o"
    config.data.image_root = Path("not/yaml/serialisable")  # yaml.safe_dump refuses a Path object
    with pytest.raises(yaml.representer.RepresenterError):
        save_trained(model, processor, out, config)
    assert not (out / "adapter_config.json").exists() and not (out / "adapter_model.safetensors").exists()
    assert not (out / ".partial" / "output").exists()

    config.data.image_root = None
    save_trained(model, processor, out, config)
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "bridge.safetensors", "train_config.yaml"} <= names
    # Saved again over a complete folder (a resumed run finishing): replaced whole, nothing left staged.
    save_trained(model, processor, out, config)
    assert {p.name for p in out.iterdir()} == names
    assert not (out / ".partial" / "output").exists()
    loaded, _ = load_pretrained(str(out), device="cpu")
    assert type(loaded).__name__ == "PeftModel"


# -- one bridge loader for train outputs and the demo ----------------------------------------------
def test_bad_bridge_file_in_an_output_folder_is_named(runs, tmp_path):
    import shutil

    from safetensors.torch import save_file

    from vlm.errors import VLMError
    from vlm.files import BRIDGE_WEIGHTS

    out = tmp_path / "lora"
    shutil.copytree(runs("lora"), out)
    save_file({"query_tokens": torch.zeros(1, 3, 5)}, str(out / BRIDGE_WEIGHTS))
    with pytest.raises(VLMError, match=r"bridge\.safetensors: query_tokens has shape \(1, 3, 5\), the model expects"):
        load_pretrained(str(out), device="cpu")
    save_file({"qformer.nope.weight": torch.zeros(2)}, str(out / BRIDGE_WEIGHTS))
    with pytest.raises(VLMError, match=r"bridge\.safetensors: weights for modules the model lacks"):
        load_pretrained(str(out), device="cpu")


# -- one-line errors ---------------------------------------------------------------------------------
def test_invalid_adapter_config_json_is_one_line(runs, tmp_path, capsys):
    import shutil

    out = tmp_path / "lora"
    shutil.copytree(runs("lora"), out)
    (out / "adapter_config.json").write_text("{not json")
    assert vlm_main(["export", str(out), "--merge-lora", "--output-dir", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "adapter_config.json: not valid JSON" in err[0]


def test_export_output_dir_that_is_a_file_is_one_line(runs, tmp_path, capsys):
    target = tmp_path / "file.txt"
    target.write_text("x")
    assert vlm_main(["export", str(runs("lora")), "--merge-lora", "--output-dir", str(target)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0] == f"error: --output-dir {target}: is a file, not a folder"


# -- dotted overrides keep text for text keys ------------------------------------------------------
def test_overrides_keep_text_for_string_keys(capsys):
    from vlm.train.config import load_config

    config = load_config(None, ["prompt.question_template=Q: {}", "resume=yes", "prompt.caption_prompt=null",
                                "output_dir=on", "lora.r=8", "lora.target_modules=[q_proj]", "data.skip_bad_images=yes"])
    assert config.prompt.question_template == "Q: {}" and config.resume == "yes" and config.output_dir == "on"
    assert config.prompt.caption_prompt is None and config.lora.r == 8 and config.lora.target_modules == ["q_proj"]
    assert config.data.skip_bad_images is True  # a bool key still reads YAML booleans
    assert vlm_main(["train", "prompt.question_template=Question: {} Answer:", "--print-config"]) == 0
    assert "question_template: 'Question: {} Answer:'" in capsys.readouterr().out


def test_a_yaml_syntax_error_keeps_its_line_and_column(tmp_path, capsys):
    cfg = tmp_path / "tabs.yaml"
    cfg.write_text("recipe: lora\ndata:\n\ttrain: x.jsonl\n")
    assert vlm_main(["train", str(cfg)]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: {cfg}:3:1: not valid YAML (found character '\\t' that cannot start any token) "
        "(YAML indents with spaces, not tabs)")


def test_train_never_replaces_a_file_it_did_not_write(base_dir, data_file, tmp_path, capsys):
    """A README.md the user keeps in output_dir stays theirs (peft's model card is left out); a file of
    theirs under a name the run writes stops the run before training; no empty .partial/ is left."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("my notes\n")
    argv = ["train", "--recipe", "lora", "--model", str(base_dir), "--train-data", str(data_file),
            "--output-dir", str(out), "--max-steps", "2", "--batch-size", "2", "report_to=none", "save_steps=1",
            "data.num_workers=0"]
    assert vlm_main(argv) == 0
    assert (out / "README.md").read_text() == "my notes\n"
    assert "kept your" in capsys.readouterr().err
    assert (out / "adapter_config.json").is_file() and not (out / ".partial").exists()
    assert vlm_main(argv) == 0  # a second run replaces its own files, and still not the README
    assert (out / "README.md").read_text() == "my notes\n"

    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text("{}")
    assert vlm_main([*argv[:8], str(other), *argv[9:]]) == 1
    assert "holds config.json, which vlm train did not write" in capsys.readouterr().err
    assert (other / "config.json").read_text() == "{}" and not (other / "checkpoint-1").exists()


# -- numbers as people write them; no abbreviated flags ----------------------------------------------
def test_exponent_numbers_read_as_numbers_in_overrides_and_files(tmp_path, capsys):
    """PyYAML (YAML 1.1) reads 1e-3 as text: `learning_rate=1e-3` must still be the number."""
    from vlm.train.config import load_config

    config = load_config(None, ["learning_rate=1e-3", "max_grad_norm=1E2", "warmup=5e-2", "weight_decay=.5e-1"])
    assert (config.learning_rate, config.max_grad_norm, config.warmup, config.weight_decay) == (1e-3, 100.0, 0.05, 0.05)
    cfg = tmp_path / "mine.yaml"
    cfg.write_text("recipe: lora\nlearning_rate: 2e-4\nmodel: 2024\nprompt:\n  caption_prompt: 1.5\n")
    config = load_config(str(cfg))
    assert config.learning_rate == 2e-4
    assert (config.model, config.prompt.caption_prompt) == ("2024", "1.5")  # text keys take numbers as text
    assert vlm_main(["train", "lora", "learning_rate=3e-5", "--print-config"]) == 0
    assert "learning_rate: 3.0e-05" in capsys.readouterr().out


@pytest.mark.parametrize("module, argv", [
    ("vlm.train.cli", ["--learning", "1e-3"]),  # --learning-rate
    ("vlm.train.evaluate", ["--data", "x.jsonl", "--task", "vqa", "--max", "8"]),  # --max-new-tokens
    ("vlm.train.export", ["runs/x", "--output-dir", "y", "--merge"]),  # --merge-lora
    ("vlm.build", ["--llm", "y", "--output-dir", "z", "--vis", "x"]),  # --vision
])
def test_train_eval_export_build_take_no_abbreviations(module, argv, capsys):
    """The abbreviated flag (the last or the one before its value) is an error, not a guess."""
    import importlib

    parser = importlib.import_module(module).build_parser()
    with pytest.raises(SystemExit) as exit_:
        parser.parse_intermixed_args(argv)
    abbreviation = argv[-1] if argv[-1].startswith("--") else argv[-2]
    assert exit_.value.code == 2 and f"unrecognized arguments: {abbreviation}" in capsys.readouterr().err


# -- a recipe from outside the package ----------------------------------------------------------------
def test_a_recipe_from_another_package_registers_and_trains(base_dir, data_file, tmp_path, monkeypatch, capsys):
    """tests/recipe_plugin.py, declared as an installed package declares it (entry point group vlm.recipes),
    trains through `vlm train` from its own YAML preset, with its defaults, loss part and output."""
    import vlm.train.recipes as recipes
    from safetensors.torch import load_file

    from vlm.errors import VLMError
    from vlm.train.config import load_config

    monkeypatch.setattr(recipes, "_REGISTERED", dict(recipes._REGISTERED))  # this test's registrations stay here
    dist = tmp_path / "site" / "my_recipes-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-recipes\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[vlm.recipes]\nprojection-only = recipe_plugin:ProjectionOnly\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert recipes.recipe_names()[-1] == "projection-only"

    preset = tmp_path / "projection-only.yaml"
    preset.write_text(f"recipe: projection-only\nmodel: {base_dir}\ndata:\n  train: {data_file}\n  num_workers: 0\n")
    out = tmp_path / "out"
    assert vlm_main(["train", str(preset), "--print-config"]) == 0
    assert "learning_rate: 0.01\n" in capsys.readouterr().out  # the recipe's default
    assert vlm_main(["train", str(preset), f"output_dir={out}", "max_steps=4", "logging_steps=2", "report_to=none",
                     "save_steps=1000"]) == 0
    printed = capsys.readouterr().out
    assert "recipe projection-only: training" in printed and "'loss_projection_norm':" in printed
    before, after = load_file(base_dir / "model.safetensors"), load_file(out / "model.safetensors")
    moved = {name for name in before if not torch.equal(before[name], after[name])}
    assert moved == {"language_projection.weight", "language_projection.bias"}
    assert json.loads((out / "projection-only.json").read_text()) == {"trained": "language_projection"}
    assert type(load_pretrained(str(out), device="cpu")[0]).__name__ == "VisionLanguageModel"

    with pytest.raises(VLMError, match=r"recipe must be a registered recipe \(stage1, .*projection-only\), got 'x'"):
        load_config(None, ["recipe=x"])
