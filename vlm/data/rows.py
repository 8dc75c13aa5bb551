"""Plain rows: JSONL, CSV/TSV or a JSON array of `{image, text}` / `{image, question, answer}` /
`{image, conversations}` objects. Also the row logic the imagefolder and HF readers share.

Row fields (besides the image column):
- caption: the text column (`text` by default; `caption` is accepted too). A list of strings is
  several reference captions (the first is the training target).
- vqa: `question`, and `answer` (a string) or `answers` (a list of strings or of VQAv2-style
  `{"answer": ...}` objects; in CSV a JSON list).
- chat: `conversations` (LLaVA `{"from", "value"}` turns) or `messages` (`{"role", "content"}`).
Other scalar fields (question_id, question_type, answer_type, ...) are kept in `Example.meta`.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

from ..errors import VLMError
from .common import require_text, row_error
from .records import TASKS, Example

CAPTION_FIELDS = ("text", "caption")
CHAT_FIELDS = ("conversations", "messages")
ROLE_NAMES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
IMAGE_MARKER = "<image>"


def read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise row_error(f"{path}:{lineno}", f"not valid JSON ({e.msg}, column {e.colno})") from None
            if not isinstance(row, dict):
                raise row_error(f"{path}:{lineno}", f"expected a JSON object, got {type(row).__name__}")
            yield lineno, row


def read_csv(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, row dict) for each data row; TSV when the file name ends in .tsv."""
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    with open(path, encoding="utf-8-sig", newline="") as f:  # -sig: Excel's UTF-8 byte-order mark
        reader = csv.DictReader(f, delimiter=delimiter)
        if not reader.fieldnames:
            raise VLMError(f"{path}: no header row (expected columns such as image,text)")
        for row in reader:
            source_line = reader.line_num  # the (last) line this row was read from
            if None in row:  # more cells than header columns
                raise row_error(f"{path}:{source_line}", f"more cells than the {len(reader.fieldnames)} header columns")
            if all(not (v or "").strip() for v in row.values()):
                continue
            yield source_line, {k: v for k, v in row.items() if v is not None and v != ""}


def infer_task(row: dict, text_column: str) -> str:
    """What a row without an explicit task is: chat, vqa or caption, by its fields."""
    if any(f in row for f in CHAT_FIELDS):
        return "chat"
    if "question" in row:
        return "vqa"
    return "caption"


def row_to_example(
    row: dict, task: str | None, source: str, image, text_column: str = "text", image_column: str = "image"
) -> Example:
    """One `Example` from a row dict; `image` is the already-resolved path or in-memory image."""
    task = task or infer_task(row, text_column)
    if task not in TASKS:
        raise VLMError(f"task must be one of {', '.join(TASKS)}; got {task!r}")
    used = {image_column, text_column, *CAPTION_FIELDS, *CHAT_FIELDS, "question", "answer", "answers"}
    meta = {k: v for k, v in row.items() if k not in used and isinstance(v, (str, int, float, bool))}
    if task == "caption":
        captions = _captions(row, text_column, source)
        return Example("caption", image, caption=captions[0], answers=captions, source=source, meta=meta)
    if task == "vqa":
        question = require_text(row, "question", source)
        return Example("vqa", image, question=question, answers=_answers(row, source), source=source, meta=meta)
    conversation = _conversation(row, source)
    if image is not None and not any(IMAGE_MARKER in t["content"] for t in conversation):
        # The contract: "<image>" marks where the image goes; LLaVA puts it before the first question.
        first_user = next(i for i, t in enumerate(conversation) if t["role"] == "user")
        turn = conversation[first_user]
        conversation[first_user] = {**turn, "content": f"{IMAGE_MARKER}\n{turn['content']}"}
    return Example("chat", image, conversation=conversation, source=source, meta=meta)


def _captions(row: dict, text_column: str, source: str) -> list[str]:
    field = text_column
    if field not in row and text_column == "text":
        field = next((f for f in CAPTION_FIELDS if f in row), text_column)
    value = row.get(field)
    if isinstance(value, list):
        if not value or not all(isinstance(v, str) and v.strip() for v in value):
            raise row_error(source, f"field {field!r} must be a caption or a non-empty list of captions")
        return [v.strip() for v in value]
    return [require_text(row, field, source, what="the caption")]


def _answers(row: dict, source: str) -> list[str]:
    if "answers" in row and row["answers"] is not None:
        value = row["answers"]
        if isinstance(value, str):
            # CSV cells hold a JSON list, or a single answer.
            try:
                value = json.loads(value) if value.strip().startswith("[") else [value]
            except json.JSONDecodeError as e:
                raise row_error(source, f"field 'answers' is not a JSON list ({e.msg})") from None
        if not isinstance(value, list) or not value:
            raise row_error(source, "field 'answers' must be a non-empty list of answers")
        answers = [a.get("answer") if isinstance(a, dict) else a for a in value]
        if not all(isinstance(a, (str, int, float)) and str(a).strip() for a in answers):
            raise row_error(source, "field 'answers' holds an empty or non-text answer")
        return [str(a).strip() for a in answers]
    return [require_text(row, "answer", source, what="or 'answers'")]


def _conversation(row: dict, source: str) -> list[dict]:
    field = next((f for f in CHAT_FIELDS if f in row), None)
    if field is None:
        raise row_error(source, f"missing field 'conversations' (chat data); fields present: {', '.join(sorted(row))}")
    turns = row[field]
    if isinstance(turns, str):
        try:
            turns = json.loads(turns)
        except json.JSONDecodeError as e:
            raise row_error(source, f"field {field!r} is not a JSON list ({e.msg})") from None
    if not isinstance(turns, list) or not turns:
        raise row_error(source, f"field {field!r} must be a non-empty list of turns")
    out = []
    for i, turn in enumerate(turns):
        where = f"{field}[{i}]"
        if not isinstance(turn, dict):
            raise row_error(source, f"{where} must be an object")
        role_key, content_key = ("from", "value") if "from" in turn else ("role", "content")
        role = ROLE_NAMES.get(str(turn.get(role_key, "")).lower())
        if role is None:
            raise row_error(source, f"{where}.{role_key} must be human/gpt or user/assistant, got {turn.get(role_key)!r}")
        content = turn.get(content_key)
        if not isinstance(content, str):
            raise row_error(source, f"{where}.{content_key} must be a string")
        out.append({"role": role, "content": content})
    if not any(t["role"] == "assistant" for t in out):
        raise row_error(source, f"field {field!r} has no assistant (gpt) turn to learn from")
    if not any(t["role"] == "user" for t in out):
        raise row_error(source, f"field {field!r} has no user (human) turn")
    return out
