"""The one record type every data format is read into (the contract between data and trainer)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import PIL.Image

TASKS = ("caption", "vqa", "chat")


@dataclass
class Example:
    """One training/eval sample, independent of the file format it came from."""

    task: str  # "caption" | "vqa" | "chat"
    # Absolute path (decoded lazily, in DataLoader workers) or an in-memory image (HF datasets).
    image: str | PIL.Image.Image | None
    caption: str | None = None  # caption task: the target caption
    question: str | None = None  # vqa task
    # vqa: all reference answers (VQAv2 has 10); caption: all reference captions (for eval)
    answers: list[str] | None = None
    # chat task: [{"role": "user"|"assistant", "content": str}], "<image>" marks the image
    conversation: list[dict] | None = None
    source: str = ""  # "file.jsonl:12" for error messages
    # Extra fields of the row kept for evaluation reports (question_id, question_type, answer_type,
    # image_id...). Never used for training; an addition after the agreed fields, so defaults to {}.
    meta: dict = field(default_factory=dict)
    # chat task: the second and later images of a conversation (one `<image>` marker each).
    extra_images: list = field(default_factory=list)

    @property
    def images(self) -> list:
        """Every image of the example, in the order of their markers (empty for text-only rows)."""
        return [] if self.image is None else [self.image, *self.extra_images]

    @property
    def target(self) -> str:
        """The training target: the caption, the most common answer, or the last assistant turn."""
        if self.task == "caption":
            if self.caption is not None:
                return self.caption
            if self.answers:
                return self.answers[0]
        elif self.task == "vqa":
            if self.answers:
                # Most common answer; ties go to the one listed first (Counter keeps insertion order).
                return Counter(self.answers).most_common(1)[0][0]
        elif self.task == "chat":
            for turn in reversed(self.conversation or []):
                if turn.get("role") == "assistant":
                    return turn.get("content", "")
        return ""


class ExampleList(list):
    """A list of `Example` that also says how many bad-image rows were skipped while loading."""

    def __init__(self, items=(), skipped: list[str] | None = None):
        super().__init__(items)
        #: sources ("file:row") of the rows dropped because their image was missing or broken
        self.skipped_rows: list[str] = list(skipped or [])

    @property
    def skipped(self) -> int:
        """How many rows were dropped for a missing/broken image (only with skip_bad_images=True)."""
        return len(self.skipped_rows)
