"""Training throughput of `vlm train --recipe lora` vs a plain transformers `Trainer` + peft script.

Both train the same random-weight, mid-size `vlm` model (BLIP-2 vision tower, Q-Former, Llama
LLM) on the same JPEG captions read from disk, with the same LoRA (rank, targets: the LLM's
attention + MLP projections), the same trainable bridge, batch size, steps, precision and seed.

- ours:     `vlm train --recipe lora ...` (in this process: `vlm.cli.main`), which decodes and
            tokenizes in DataLoader workers on a GPU (on CPU, in the main process);
- baseline: what a user writes from the transformers/peft docs: a Dataset of (path, caption),
            a collator that opens the images and calls the processor on the batch, `Trainer`.

Both save one checkpoint at the end (Trainer's default `save_strategy="steps"` does). With
`--samples` below steps x batch size, images repeat (epochs), and ours encodes each image once
with its frozen vision tower (train/vision_cache.py); `--samples` >= steps x batch size
(one epoch) measures the loop alone.

Prints each run's training samples/s (Trainer's `train_samples_per_second`, which counts the
whole loop: data loading, forward, backward, optimizer) and the ratio ours / baseline.

    python bench/train.py [--steps 30] [--batch-size 8] [--samples 64] [--precision fp32|bf16] [--workers auto|N]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
import tiny  # noqa: E402

from vlm import VisionLanguageModel, VLMConfig, VLMProcessor  # noqa: E402
from vlm.cli import main as vlm_main  # noqa: E402

IMAGE_SIZE = 224
WORDS = "a the red blue green cat dog sofa cup of coffee rocket on white background small yellow square".split()


def build_model(path: Path) -> Path:
    """A mid-size random `vlm` checkpoint: ViT 384x4 @224, Q-Former 384x2 (32 queries), Llama 512x4."""
    from transformers import BlipImageProcessor

    tokenizer = tiny.make_tokenizer("llama")
    processor = VLMProcessor(
        BlipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}), tokenizer, num_query_tokens=32,
        caption_prompt="a photo of",
    )
    config = VLMConfig(
        vision_config={"model_type": "blip_2_vision_model", "hidden_size": 384, "intermediate_size": 1536,
                       "num_hidden_layers": 4, "num_attention_heads": 6, "image_size": IMAGE_SIZE, "patch_size": 14},
        qformer_config={"model_type": "blip_2_qformer", "hidden_size": 384, "num_hidden_layers": 2,
                        "num_attention_heads": 6, "intermediate_size": 1536, "cross_attention_frequency": 1},
        text_config={"model_type": "llama", "vocab_size": len(tokenizer), "hidden_size": 512, "intermediate_size": 1408,
                     "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 4,
                     "max_position_embeddings": 256, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
        num_query_tokens=32,
        image_token_index=processor.image_token_id,
    )
    torch.manual_seed(0)
    VisionLanguageModel(config).save_pretrained(path)
    processor.save_pretrained(path)
    return path


def write_data(folder: Path, n: int) -> Path:
    rng = np.random.default_rng(0)
    with open(folder / "train.jsonl", "w") as f:
        for i in range(n):
            pixels = rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)  # photo-sized JPEGs, decoded each epoch
            Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)
            caption = " ".join(rng.choice(WORDS, size=int(rng.integers(5, 15))))
            f.write(json.dumps({"image": f"{i}.jpg", "text": caption}) + "\n")
    return folder / "train.jsonl"


def run_ours(model_dir: Path, data: Path, out: Path, args) -> float:
    argv = [
        "train", "--recipe", "lora", "--model", str(model_dir), "--train-data", str(data), "--output-dir", str(out),
        "--max-steps", str(args.steps), "--batch-size", str(args.batch_size), "--precision", args.precision,
        "--save-steps", "100000", "warmup=0", "report_to=none", "logging_steps=100000",
        f"data.num_workers={args.workers}", "lora.r=16", "lora.dropout=0.05",
    ]
    assert vlm_main(argv) == 0
    return json.loads((out / "train_results.json").read_text())["train_samples_per_second"]


class PathCaptionDataset(torch.utils.data.Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def run_baseline(model_dir: Path, data: Path, out: Path, args) -> float:
    """The plain recipe: peft LoRA on the LLM, collator opens images and calls the processor."""
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments, set_seed

    set_seed(0)
    model = VisionLanguageModel.from_pretrained(model_dir)
    processor = VLMProcessor.from_pretrained(model_dir)
    tok = processor.tokenizer
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    rows = [(str(data.parent / r["image"]), r["text"]) for r in rows]
    targets = r"language_model\..*\.(?:q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=targets))
    for name, p in model.named_parameters():
        if any(part in name for part in ("query_tokens", "qformer.", "language_projection.")):
            p.requires_grad_(True)

    def collate(batch):
        images = [Image.open(path).convert("RGB") for path, _ in batch]
        prompt = processor.caption_prompt
        prompt_enc = processor(images=images, text=[prompt] * len(batch))
        rows_ids, rows_labels = [], []
        for ids, mask, (_, caption) in zip(prompt_enc["input_ids"], prompt_enc["attention_mask"], batch):
            ids = ids[mask.bool()].tolist()
            target = tok(" " + caption, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            rows_ids.append(ids + target)
            rows_labels.append([-100] * len(ids) + target)
        width = max(map(len, rows_ids))
        return {
            "input_ids": torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows_ids]),
            "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows_ids]),
            "labels": torch.tensor([r + [-100] * (width - len(r)) for r in rows_labels]),
            "pixel_values": prompt_enc["pixel_values"],
        }

    training_args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=args.batch_size, max_steps=args.steps,
        learning_rate=1e-4, lr_scheduler_type="cosine", save_strategy="steps", save_steps=100000, report_to="none",
        remove_unused_columns=False, label_names=["labels"], bf16=args.precision == "bf16", use_cpu=not torch.cuda.is_available(),
        logging_steps=100000, seed=42,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=PathCaptionDataset(rows), data_collator=collate)
    return trainer.train().metrics["train_samples_per_second"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--workers", default="auto", help="DataLoader workers for vlm train (default: its own choice)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = build_model(tmp / "model")
        data = write_data(tmp, args.samples)
        # Baseline first, then ours, then the baseline again: the mean baseline absorbs drift.
        base1 = run_baseline(model_dir, data, tmp / "base1", args)
        ours = run_ours(model_dir, data, tmp / "ours", args)
        base2 = run_baseline(model_dir, data, tmp / "base2", args)
    baseline = (base1 + base2) / 2
    print(json.dumps({
        "steps": args.steps, "batch_size": args.batch_size, "precision": args.precision, "threads": torch.get_num_threads(),
        "ours_samples_per_s": round(ours, 2), "baseline_samples_per_s": [round(base1, 2), round(base2, 2)],
        "ratio": round(ours / baseline, 3),
    }))


if __name__ == "__main__":
    main()
