"""Chat state: Gradio history -> model messages, image placement, trimming.

Gradio's history (messages format) is the source of truth for a conversation, so undo,
regenerate, edit and clear on the page, and per-session state for API clients, need no
bookkeeping here. What this module adds is what the model needs on top: where each image
sits, and which earlier turns still fit in the LLM's context. (Each image is encoded once
however many turns mention it: the inference engine's feature cache is keyed by content.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vlm.errors import VLMError

# Assistant replies that start with this are our own error notes, not model output: the turn
# that produced one is left out of what the model sees next time. A note after an answer (a
# warning about the image) follows NOTE_SEPARATOR and is cut off the reply the same way.
NOTICE_PREFIX = "⚠️ "
NOTE_SEPARATOR = "\n\n" + NOTICE_PREFIX


def note(text: str) -> str:
    """`text` as a note after an answer (what the model never sees in later turns)."""
    return f"{NOTE_SEPARATOR}{text[:1].upper()}{text[1:]}."


@dataclass
class Turn:
    """One user message (text + images, in the order sent) and the assistant's reply, if any."""

    images: list = field(default_factory=list)  # file paths (chat) or PIL images (API), in the order sent
    parts: list[dict[str, Any]] = field(default_factory=list)  # [{"type": "image"} | {"type": "text", ...}]
    reply: str | None = None

    def user_message(self) -> dict[str, Any]:
        return {"role": "user", "content": list(self.parts)}


def _file_path(part: Any) -> str | None:
    """The file path of a history content part, in any of the shapes Gradio uses."""
    if isinstance(part, dict):
        if part.get("type") == "file":
            part = part.get("file") or {}
        if isinstance(part, dict) and isinstance(part.get("path"), str):
            return part["path"]
    if isinstance(part, (tuple, list)) and part and isinstance(part[0], str):  # legacy (path, alt)
        return part[0]
    path = getattr(part, "path", None)
    return path if isinstance(path, str) else None


def _text(part: Any) -> str | None:
    if isinstance(part, str):
        return part
    if isinstance(part, dict) and part.get("type") == "text":
        return str(part.get("text", ""))
    return None


def history_to_turns(history: list[dict[str, Any]]) -> list[Turn]:
    """Group a Gradio messages-format history into turns.

    Consecutive user messages (Gradio stores each uploaded file as its own message) merge into
    one turn; a turn whose reply is one of our error notices is dropped, so the model never sees
    a failed upload or a failed generation as if it were conversation.
    """
    turns: list[Turn] = []
    current: Turn | None = None
    for message in history or []:
        role = message.get("role") if isinstance(message, dict) else getattr(message, "role", None)
        content = message.get("content") if isinstance(message, dict) else getattr(message, "content", None)
        parts = content if isinstance(content, list) else [content]
        if role == "user":
            if current is None or current.reply is not None:
                current = Turn()
                turns.append(current)
            for part in parts:
                path = _file_path(part)
                text = _text(part)
                if path is not None:
                    current.images.append(path)
                    current.parts.append({"type": "image"})
                elif text:
                    current.parts.append({"type": "text", "text": text})
        elif role == "assistant" and current is not None:
            text = "".join(t for t in (_text(p) for p in parts) if t)
            current.reply = (current.reply or "") + text.split(NOTE_SEPARATOR, 1)[0]
    return [t for t in turns if t.parts and not (t.reply or "").startswith(NOTICE_PREFIX)]


def new_turn(text: str, image_paths: list[str]) -> Turn:
    """The turn being asked now: images first (in the order sent), then the text."""
    turn = Turn(images=list(image_paths))
    turn.parts = [{"type": "image"} for _ in image_paths]
    if text:
        turn.parts.append({"type": "text", "text": text})
    return turn


def turns_to_messages(turns: list[Turn], system_prompt: str | None = None) -> list[dict[str, Any]]:
    """Chat-template messages for `turns`; the last turn is the one being answered."""
    messages: list[dict[str, Any]] = []
    if system_prompt and system_prompt.strip():
        messages.append({"role": "system", "content": system_prompt.strip()})
    for turn in turns:
        messages.append(turn.user_message())
        if turn.reply is not None:
            messages.append({"role": "assistant", "content": turn.reply})
    return messages


def render_prompt(processor, turns: list[Turn], system_prompt: str | None = None) -> str:
    """The exact prompt text the model reads for `turns`: `processor.format_chat`, the rule training
    and eval use too (the chat template; without one, the question chain the checkpoint was trained
    with, images in front). A last message with neither text nor an image is a `VLMError` (an
    image alone gets the caption prompt).
    """
    marker = processor.image_token
    check_no_marker(turns, system_prompt, marker)
    last = turns[-1] if turns else Turn()
    if not last.images and not any(p.get("text", "").strip() for p in last.parts if p.get("type") == "text"):
        # Nothing to answer: without a template the prompt would be empty (no token to start from).
        raise VLMError("the message is empty: send some text or an image")
    return processor.format_chat(turns_to_messages(turns, system_prompt))


def check_no_marker(turns: list[Turn], system_prompt: str | None, marker: str) -> None:
    """`VLMError` naming the message when any text holds the image `marker`: the processor would
    count it as an image that was never sent."""
    if system_prompt and marker in system_prompt:
        raise VLMError(f"the system prompt may not contain {marker}")
    for n, turn in enumerate(turns, 1):
        for part in turn.parts:
            if part.get("type") == "text" and marker in part.get("text", ""):
                raise VLMError(f"the message text may not contain {marker}; attach images as images")
        if turn.reply and marker in turn.reply:
            raise VLMError(f"the assistant's reply in turn {n} may not contain {marker}")


def prompt_tokens(processor, turns: list[Turn], system_prompt: str | None = None) -> int:
    """Tokens of the prompt for `turns` as the model reads it (image tokens included)."""
    images = sum(len(turn.images) for turn in turns)
    return len(processor(text=render_prompt(processor, turns, system_prompt), images_per_text=[images],
                         return_tensors=None)["input_ids"][0])
