"""`vlm train` encodes each image once with a frozen vision tower (train/vision_cache.py).

Real runs through the CLI on a tiny model: the cached run must train to the same weights as an
uncached one, say how many images it reused, stay inside its memory budget, and turn itself off
when the tower's output can change between steps.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tiny
from vlm.train.vision_cache import VisionFeatureCache, cache_blocker
from vlm import VisionLanguageModel, load_pretrained
from vlm.cli import main as vlm_main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    return tiny.save_tiny_vlm(tmp_path_factory.mktemp("cache-base"), num_query_tokens=4)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    """4 images, 2 rows each (a caption and a question): every image is seen twice per epoch."""
    folder = tmp_path_factory.mktemp("cache-data")
    with open(folder / "train.jsonl", "w") as f:
        for i in range(4):
            tiny.random_image(i).save(folder / f"{i}.png")
            f.write(json.dumps({"image": f"{i}.png", "text": f"picture number {i}"}) + "\n")
            f.write(json.dumps({"image": f"{i}.png", "question": "which one?", "answer": str(i)}) + "\n")
    return folder / "train.jsonl"


def train(base: Path, data: Path, out: Path, *extra: str, recipe: str = "lora") -> None:
    argv = [
        "train", "--recipe", recipe, "--model", str(base), "--train-data", str(data), "--output-dir", str(out),
        "--max-steps", "8", "--batch-size", "4", "--learning-rate", "5e-3", "warmup=0", "report_to=none",
        "logging_steps=100", "save_steps=1000", "data.num_workers=0", "lora.r=4", *extra,
    ]
    assert vlm_main(argv) == 0


def weights(out: Path) -> dict[str, torch.Tensor]:
    found = load_file(out / "adapter_model.safetensors")
    found.update({f"bridge.{k}": v for k, v in load_file(out / "bridge.safetensors").items()})
    return found


def test_cached_run_trains_the_same_weights_and_reuses_images(base_dir, data_file, tmp_path, capsys):
    train(base_dir, data_file, tmp_path / "cached")
    said = capsys.readouterr().out
    # 8 steps x 4 rows = 32 images asked for, 4 distinct: 4 computed, 28 reused.
    assert "vision features: 4 computed, 28 reused from the cache" in said
    train(base_dir, data_file, tmp_path / "plain", "vision_cache_gb=0")
    assert "vision features" not in capsys.readouterr().out
    cached, plain = weights(tmp_path / "cached"), weights(tmp_path / "plain")
    assert cached.keys() == plain.keys()
    for key in cached:
        torch.testing.assert_close(cached[key], plain[key], atol=1e-5, rtol=1e-4, msg=lambda m: f"{key}: {m}")
    # And the weights did move: the comparison is not between two untouched copies.
    base_query = VisionLanguageModel.from_pretrained(base_dir).query_tokens.detach()
    assert not torch.allclose(cached["bridge.query_tokens"], base_query)


def test_cache_turns_itself_off_when_the_vision_tower_trains(base_dir, data_file, tmp_path, capsys):
    train(base_dir, data_file, tmp_path / "full", "unfreeze=[vision_model,qformer]", recipe="full")
    said = capsys.readouterr().out
    assert "recipe full" in said and "vision features" not in said


def test_blockers_name_the_reason(base_dir):
    model = VisionLanguageModel.from_pretrained(base_dir)
    assert cache_blocker(model, vision_trainable=False, sharded=False) is None
    assert cache_blocker(model, vision_trainable=True, sharded=False) == "the vision tower trains"
    assert "FSDP" in cache_blocker(model, vision_trainable=False, sharded=True)
    model.vision_model.config.attention_dropout = 0.1
    assert "attention_dropout=0.1" in cache_blocker(model, vision_trainable=False, sharded=False)


def test_memory_budget_bounds_the_cache(base_dir):
    model = VisionLanguageModel.from_pretrained(base_dir).eval()
    pixels = torch.randn(3, 3, 30, 30)
    size = model.get_vision_features(pixels[:1]).numel() * 4  # fp32 bytes of one image
    cache = VisionFeatureCache(max_bytes=2 * size)
    first = cache.features(model, pixels, ["a", "b", "c"])
    assert len(cache) == 2 and cache.bytes == 2 * size  # the third did not fit
    again = cache.features(model, pixels, ["a", "b", "c"])
    assert (cache.hits, cache.misses) == (2, 4)  # "c" is computed again each time
    torch.testing.assert_close(again, first)
    torch.testing.assert_close(first, model.get_vision_features(pixels))
    with pytest.raises(ValueError, match="2 image keys for 3 images"):
        cache.features(model, pixels, ["a", "b"])


def test_features_on_disk_serve_a_later_run_of_the_same_tower(base_dir, data_file, tmp_path, capsys):
    """`vision_cache_dir`: the first run writes the features, the next one (another output, as stage 2
    after stage 1) reads them all and computes none; the same weights as without the disk."""
    folder = tmp_path / "features"
    train(base_dir, data_file, tmp_path / "first", f"vision_cache_dir={folder}")
    assert "4 computed, 28 reused" in capsys.readouterr().out
    (towers,) = list(folder.iterdir())
    assert len(list(towers.glob("*.safetensors"))) == 4
    train(base_dir, data_file, tmp_path / "second", f"vision_cache_dir={folder}")
    assert "0 computed, 32 reused" in capsys.readouterr().out
    for name, value in weights(tmp_path / "first").items():
        torch.testing.assert_close(weights(tmp_path / "second")[name], value, atol=1e-6, rtol=0)
    other = VisionFeatureCache(1 << 30, folder, tower_id="another tower")
    assert other.folder != towers and not list(other.folder.iterdir())


def test_the_tower_id_changes_with_the_weights_the_image_processor_and_the_precision(base_dir):
    from vlm.train.vision_cache import tower_fingerprint

    model, processor = load_pretrained(str(base_dir), device="cpu")
    tower, images = model.vision_model, processor.image_processor
    reference = tower_fingerprint(tower, images, "fp32")
    assert tower_fingerprint(tower, images, "fp32") == reference
    assert tower_fingerprint(tower, images, "bf16") != reference
    resized = copy.deepcopy(images)
    resized.size = {"height": 2 * images.size["height"], "width": 2 * images.size["width"]}
    assert tower_fingerprint(tower, resized, "fp32") != reference
    with torch.no_grad():
        next(tower.parameters()).add_(1e-3)
    assert tower_fingerprint(tower, images, "fp32") != reference
