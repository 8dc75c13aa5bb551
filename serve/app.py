"""The Gradio 6 chat UI: a multimodal `ChatInterface` around a `ChatEngine`.

Gradio supplies the page's stop / regenerate (retry) / undo / clear, the messages-format
history, and the `/chat` API endpoint, whose history lives in a `gr.State` that Gradio keeps
per client session, so `gradio_client` users get the same multi-turn behaviour as the page.
The image-feature cache is keyed by the same session hash.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
from PIL import Image, ImageDraw

from vlm.errors import VLMError

from .conversation import NOTICE_PREFIX, history_to_turns, new_turn
from .engine import ChatEngine
from .uploads import check_count

log = logging.getLogger(__name__)


@dataclass
class ChatSettings:
    """What the page shows about the running model, and the defaults of its controls."""

    model_name: str
    device: str
    dtype: str
    quantization: str
    system_prompt: str = ""
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 0.9
    concurrency: int = 2
    examples: bool = True


def notice(text: str) -> str:
    """A message for the user that the model never sees in later turns."""
    return NOTICE_PREFIX + text


def _path_of(file) -> str:
    if isinstance(file, dict):
        return str(file.get("path") or file.get("name") or "")
    return str(getattr(file, "path", None) or file)


def make_respond(engine: ChatEngine):
    """The ChatInterface function: validates the message, then streams the model's reply."""

    def respond(
        message: dict,
        history: list[dict],
        system_prompt: str,
        temperature: float,
        top_p: float,
        max_new_tokens: float,
        request: gr.Request,
    ):
        session = (getattr(request, "session_hash", None) or "anonymous") if request else "anonymous"
        message = message if isinstance(message, dict) else {"text": str(message or ""), "files": []}
        text = str(message.get("text") or "").strip()
        paths = [p for p in (_path_of(f) for f in message.get("files") or []) if p]
        if not text and not paths:
            yield notice("Empty message: type a question, attach an image, or both.")
            return
        try:
            check_count(paths)
            for path in paths:
                engine.open_upload(path)  # refuse bad uploads now, with the user's file name
            turns = history_to_turns(history) + [new_turn(text, paths)]
            prepared = engine.prepare(session, turns, system_prompt, int(max_new_tokens))
        except VLMError as e:
            yield notice(str(e))
            return
        if prepared.dropped_turns:
            gr.Info(f"Left out the {prepared.dropped_turns} oldest turn(s) to fit the model's context.")
        stop = threading.Event()
        reply = ""
        try:
            for reply in engine.stream(prepared, temperature, top_p, stop):
                yield reply
        except Exception as e:  # a generation error must not take the server down for others
            log.exception("generation failed for session %s", session[:8])
            yield notice(f"Generation failed: {type(e).__name__}: {e}".strip())
            return
        finally:
            stop.set()
        if not reply.strip():
            yield notice("The model produced no text for this message; try rephrasing or a higher temperature.")

    return respond


def example_images(folder: Path) -> list[Path]:
    """Small drawn pictures (one shape each) used as example inputs; works fully offline."""
    folder.mkdir(parents=True, exist_ok=True)
    specs = [("red-circle.png", "red", "ellipse"), ("blue-square.png", "blue", "rectangle")]
    paths = []
    for name, colour, shape in specs:
        path = folder / name
        if not path.exists():
            image = Image.new("RGB", (224, 224), "white")
            getattr(ImageDraw.Draw(image), shape)((52, 52, 172, 172), fill=colour)
            image.save(path)
        paths.append(path)
    return paths


def _copy_cached(folder: Path, source: Path, picks: list[tuple[str, str]], prefix: str) -> list[tuple[str, Path]]:
    """(question, copy in `folder`) for each picked file of the demo cache folder `source` that exists."""
    out = []
    for question, name in picks:
        if (source / name).is_file():
            target = folder / f"{prefix}{name}"
            shutil.copyfile(source / name, target)
            out.append((question, target))
    return out


def easyvqa_examples(folder: Path) -> list[tuple[str, Path]]:
    """Two easy-vqa test images (what the demo bridge was trained on), when the demo cache has them."""
    from vlm.demo.fetch import EASY_VQA, demo_root

    source = demo_root() / "files" / EASY_VQA.key / "easy_vqa" / "data" / "test" / "images"
    picks = [("What color is the shape?", "0.png"), ("Does this image contain a circle?", "1.png")]
    return _copy_cached(folder, source, picks, "easy-vqa-")


PHOTO_PROMPTS = {
    "chelsea": "What animal is in this photo?",
    "astronaut": "Describe this photo in one sentence.",
    "coffee": "What is on the table?",
    "rocket": "What is happening in this picture?",
}


def photo_examples(folder: Path) -> list[tuple[str, Path]]:
    """scikit-image's sample photos (see `vlm.demo.demo_photos`), when the demo cache has them."""
    from vlm.demo.fetch import SKIMAGE_PHOTOS, demo_root

    source = demo_root() / "files" / SKIMAGE_PHOTOS.key / "skimage" / "data"
    picks = [(PHOTO_PROMPTS[Path(name).stem], Path(name).name) for name in sorted(SKIMAGE_PHOTOS.files)]
    return _copy_cached(folder, source, picks, "photo-")


def header(settings: ChatSettings) -> str:
    return (
        f"**Model** `{settings.model_name}` · **Device** `{settings.device}` · **dtype** `{settings.dtype}` · "
        f"**Quantization** `{settings.quantization}`  \n"
        "Attach images in any turn; later questions can refer to them. Answers stream as they are generated."
    )


def offline_theme() -> gr.themes.Base:
    """Gradio's default look with system fonts: the stock theme fetches Google Fonts, which
    stalls page loads on machines without internet access and leaks visits to a third party."""
    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


def build_app(engine: ChatEngine, settings: ChatSettings) -> gr.Blocks:
    """The chat page and its `/chat` API endpoint (call `.queue(...)` and `.launch(...)` on it)."""
    examples = None
    if settings.examples:
        folder = Path(tempfile.gettempdir()) / "vlm-chat-examples"
        circle, square = example_images(folder)
        if str(folder) not in engine.upload_dirs:  # our own example pictures may be read too
            engine.upload_dirs.append(str(folder))
        examples = [
            {"text": "What shape is in this picture?", "files": [str(circle)]},
            {"text": "Describe the image in one sentence.", "files": [str(square)]},
        ]
        examples += [{"text": q, "files": [str(p)]} for q, p in easyvqa_examples(folder) + photo_examples(folder)]
    max_tokens = max(16, min(2048, engine.context_length // 2))
    with gr.Blocks(title="vlm chat") as demo:
        gr.Markdown("## vlm chat")
        gr.Markdown(header(settings), elem_id="vlm-header")
        gr.ChatInterface(
            make_respond(engine),
            multimodal=True,
            textbox=gr.MultimodalTextbox(
                # No file_types filter: Gradio would refuse a non-image with an API error before our
                # code runs; we answer every bad upload with a readable message in the chat instead.
                file_count="multiple",
                placeholder="Ask about an image…",
                sources=["upload"],
                stop_btn=True,
                elem_id="vlm-input",
            ),
            chatbot=gr.Chatbot(height=460, label="Conversation", elem_id="vlm-chatbot"),
            # render=False: inside our Blocks they would otherwise render above the chat, not in
            # the (closed) settings accordion.
            additional_inputs=[
                gr.Textbox(settings.system_prompt, label="System prompt", lines=2, render=False),
                gr.Slider(
                    0.0, 2.0, value=settings.temperature, step=0.05, label="Temperature (0 = greedy)", render=False
                ),
                gr.Slider(0.05, 1.0, value=settings.top_p, step=0.05, label="Top-p", render=False),
                gr.Slider(
                    1,
                    max_tokens,
                    value=min(settings.max_new_tokens, max_tokens),
                    step=1,
                    label="Max new tokens",
                    render=False,
                ),
            ],
            additional_inputs_accordion=gr.Accordion("Generation settings", open=False, render=False),
            # One-element rows: the examples fill the message only and keep the current settings.
            examples=[[e] for e in examples] if examples else None,
            cache_examples=False,
            api_name="chat",
            concurrency_limit=settings.concurrency,
            fill_height=False,
        )

        def forget(request: gr.Request) -> None:
            engine.cache.drop(request.session_hash)

        demo.unload(forget)
    return demo
