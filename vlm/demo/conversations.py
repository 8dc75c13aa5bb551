"""Conversations about easy-vqa images: what the demo's chat is trained and measured on.

Built from image labels (colour, shape) only, so the train split's conversations never see a test
image. Each conversation is a `messages` row (`vlm train`'s chat format, `<image>` markers where
the images go, `image` holding one path or a list):

- several questions about one image in one conversation; follow-ups that refer back without the
  image ("and its shape?", "is it red?", "what about the colour?"); a description turn;
- two images in one message ("which image shows the circle?", "what colour is the shape in the
  second image?", "are they the same colour?");
- many wordings of each question. The wordings in `HELD_OUT` never appear in training: the test
  conversations use them to measure generalisation to new phrasings.

Answers are short and fixed per question kind (a colour, a shape, yes/no, "a red circle"; a
two-image comparison names both images first: "the first is red and the second is blue, so no"),
so a test answer is right or wrong by exact match. Test rows end with the
assistant turn to compare with; `meta.kind` names what the last question tests.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

COLOUR_QUESTIONS = [
    "What color is the shape?", "what colour is the shape?", "What is the color of the shape?",
    "Which color is it?", "what color is this shape?", "Tell me the color of the shape.",
    "What's the colour of the object?", "Name the color of the shape.", "What color do you see?",
    "what is the shape's colour?", "Which colour does the shape have?", "What color is the object in the picture?",
]
SHAPE_QUESTIONS = [
    "What shape is it?", "what is the shape?", "Which shape is this?", "What kind of shape is in the image?",
    "Name the shape.", "what shape do you see?", "Tell me the shape.", "What is the shape in the picture?",
    "Which geometric shape is shown?", "what shape is the object?",
]
DESCRIBE = ["Describe the image.", "What do you see?", "describe this picture.", "What is in the image?",
            "Describe what you see."]
COLOUR_FOLLOWUPS = ["And what about the colour?", "and its color?", "What about the color?", "And the colour?",
                    "what colour is it?", "and which color?"]
SHAPE_FOLLOWUPS = ["And its shape?", "and what is the shape?", "What about the shape?", "And the shape?",
                   "what shape is it?", "and which shape?"]
IS_COLOUR = ["Is it {}?", "is the shape {}?", "Is this shape {}?", "is it {} then?"]
IS_SHAPE = ["Is it a {}?", "is this a {}?", "Is the shape a {}?", "Does the image show a {}?"]
# Two images in one message.
WHICH_SHAPE = ["Which image shows the {}?", "which of the images has a {}?", "In which image is the {}?"]
COLOUR_IN = ["What colour is the shape in the {} image?", "what color is the shape in the {} picture?",
             "Which color is the {} image's shape?"]
SHAPE_IN = ["What shape is in the {} image?", "which shape does the {} picture show?"]
SAME_COLOUR = ["Are they the same colour?", "do the two shapes have the same color?", "Same color in both images?"]
SAME_SHAPE = ["Are they the same shape?", "do both images show the same shape?"]
# Wordings kept out of training: the paraphrase test.
HELD_OUT = {
    "color": ["Can you tell me what color the shape is?", "identify the colour of the shape.",
              "What colour has the shape got?", "Could you name the shape's color?"],
    "shape": ["Can you tell me what shape this is?", "identify the shape in the picture.",
              "What geometric figure is this?", "Could you name the shape?"],
}
ORDINAL = ("first", "second")


def _user(text: str, images: int = 0) -> dict:
    return {"role": "user", "content": "<image>\n" * images + text}


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def _answer(label: dict, kind: str) -> str:
    return {"color": label["color"], "shape": label["shape"],
            "describe": f"a {label['color']} {label['shape']}"}[kind]


def one_image_conversation(rng: random.Random, label: dict, others: dict) -> list[dict]:
    """2-3 turns about one image: a first question with the image, then follow-ups without it."""
    first = rng.choice(["color", "shape", "describe", "is_color", "is_shape"])
    turns = _question(rng, first, label, others, first_turn=True)
    asked = {first}
    for _ in range(rng.choice([1, 1, 2])):
        kind = rng.choice([k for k in ("color", "shape", "is_color", "is_shape", "describe") if k not in asked])
        asked.add(kind)
        turns += _question(rng, kind, label, others, first_turn=False)
    turns[0]["content"] = "<image>\n" + turns[0]["content"]
    return turns


def _question(rng: random.Random, kind: str, label: dict, others: dict, first_turn: bool) -> list[dict]:
    if kind in ("color", "shape"):
        pool = {"color": COLOUR_QUESTIONS, "shape": SHAPE_QUESTIONS}[kind]
        if not first_turn:
            pool = pool + {"color": COLOUR_FOLLOWUPS, "shape": SHAPE_FOLLOWUPS}[kind]
        return [_user(rng.choice(pool)), _assistant(_answer(label, kind))]
    if kind == "describe":
        return [_user(rng.choice(DESCRIBE)), _assistant(_answer(label, "describe"))]
    attribute = "color" if kind == "is_color" else "shape"
    truth = rng.random() < 0.5
    value = label[attribute] if truth else rng.choice([v for v in others[attribute] if v != label[attribute]])
    template = rng.choice(IS_COLOUR if attribute == "color" else IS_SHAPE)
    return [_user(template.format(value)), _assistant("yes" if truth else "no")]


TWO_IMAGE_KINDS = ("which_shape", "color_in", "shape_in", "same_color", "same_shape")
# Training draws the comparisons twice as often: they need both images at once (one image's colour
# or shape alone is what single-image rows already teach).
TRAINING_TWO_IMAGE_KINDS = TWO_IMAGE_KINDS + ("which_shape", "same_color", "same_shape")


def _both(labels: tuple[dict, dict], attribute: str) -> str:
    """What a comparison compares, named per image: "the first is red and the second is blue"."""
    article = "a " if attribute == "shape" else ""
    return f"the first is {article}{labels[0][attribute]} and the second is {article}{labels[1][attribute]}"


def two_image_question(rng: random.Random, labels: tuple[dict, dict], shapes: list[str],
                       kinds: tuple[str, ...] = TWO_IMAGE_KINDS) -> tuple[str, str, str]:
    """(question, answer, kind) about two images sent together. A comparison's answer says what
    each image shows before its verdict ("the first is a circle and the second is a triangle, so
    the first image"): the verdict then follows from two single-image facts the model gets right."""
    kind = rng.choice(kinds)
    if kind == "which_shape":
        shape = rng.choice([labels[0]["shape"], labels[1]["shape"], *shapes])
        hits = [i for i in (0, 1) if labels[i]["shape"] == shape]
        verdict = {(0,): "the first image", (1,): "the second image", (0, 1): "both images"}.get(tuple(hits),
                                                                                                  "neither image")
        return rng.choice(WHICH_SHAPE).format(shape), f"{_both(labels, 'shape')}, so {verdict}", kind
    if kind in ("color_in", "shape_in"):
        which = rng.choice((0, 1))
        template = rng.choice(COLOUR_IN if kind == "color_in" else SHAPE_IN)
        return template.format(ORDINAL[which]), labels[which]["color" if kind == "color_in" else "shape"], kind
    attribute = "color" if kind == "same_color" else "shape"
    verdict = "yes" if labels[0][attribute] == labels[1][attribute] else "no"
    question = rng.choice(SAME_COLOUR if attribute == "color" else SAME_SHAPE)
    return question, f"{_both(labels, attribute)}, so {verdict}", kind


def _pair(rng: random.Random, rows: list[dict]) -> tuple[dict, dict]:
    """Two different images; every other pair shares its colour or its shape (so "same" questions
    are not almost always "no")."""
    first = rng.choice(rows)
    if rng.random() < 0.5:
        attribute = rng.choice(["color", "shape"])
        matches = [r for r in rows if r[attribute] == first[attribute] and r["image"] != first["image"]]
        return first, rng.choice(matches)
    return first, rng.choice([r for r in rows if r["image"] != first["image"]])


def training_rows(labels: list[dict], seed: int = 0, one_image: int = 6000, two_images: int = 20000) -> list[dict]:
    """Train-split conversations: `labels` rows are `{image, color, shape}`."""
    rng = random.Random(seed)
    others = {"color": sorted({r["color"] for r in labels}), "shape": sorted({r["shape"] for r in labels})}
    rows = []
    for _ in range(one_image):
        label = rng.choice(labels)
        rows.append({"image": label["image"], "messages": one_image_conversation(rng, label, others)})
    for _ in range(two_images):
        pair = _pair(rng, labels)
        question, answer, _ = two_image_question(rng, pair, others["shape"], TRAINING_TWO_IMAGE_KINDS)
        messages = [_user(question, images=2), _assistant(answer)]
        if rng.random() < 0.4:  # a follow-up about one of them, without the images
            which = rng.choice((0, 1))
            attribute = rng.choice(["color", "shape"])
            question = rng.choice(COLOUR_IN if attribute == "color" else SHAPE_IN).format(ORDINAL[which])
            messages += [_user(f"And {question[0].lower()}{question[1:]}"), _assistant(pair[which][attribute])]
        rows.append({"image": [pair[0]["image"], pair[1]["image"]], "messages": messages})
    rng.shuffle(rows)
    return rows


def test_sets(labels: list[dict], seed: int = 1, count: int = 1000) -> dict[str, list[dict]]:
    """Test-split conversations, each ending with the answer to compare with:
    `followups` (the last question refers back, without the image), `two_images`, `paraphrases`
    (held-out wordings, one image)."""
    rng = random.Random(seed)
    others = {"color": sorted({r["color"] for r in labels}), "shape": sorted({r["shape"] for r in labels})}
    sets: dict[str, list[dict]] = {"followups": [], "two_images": [], "paraphrases": []}
    for _ in range(count):
        label = rng.choice(labels)
        first = rng.choice(["color", "shape", "describe"])
        turns = _question(rng, first, label, others, first_turn=True)
        turns[0]["content"] = "<image>\n" + turns[0]["content"]
        kind = rng.choice([k for k in ("color", "shape", "is_color", "is_shape") if k != first])
        turns += _question(rng, kind, label, others, first_turn=False)
        sets["followups"].append({"image": label["image"], "messages": turns, "kind": kind})

        pair = _pair(rng, labels)
        question, answer, kind = two_image_question(rng, pair, others["shape"])
        sets["two_images"].append({"image": [pair[0]["image"], pair[1]["image"]],
                                   "messages": [_user(question, images=2), _assistant(answer)], "kind": kind})

        label = rng.choice(labels)
        kind = rng.choice(["color", "shape"])
        sets["paraphrases"].append({"image": label["image"], "kind": kind, "messages": [
            _user(rng.choice(HELD_OUT[kind]), images=1), _assistant(_answer(label, kind))]})
    return sets


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def labels_of(captions_file: Path) -> list[dict]:
    """`{image, color, shape}` from an easy-vqa captions file ("a red circle")."""
    out = []
    for line in captions_file.read_text().splitlines():
        row = json.loads(line)
        _, color, shape = row["text"].split()
        out.append({"image": row["image"], "color": color, "shape": shape})
    return out


def write_all(files: dict[str, Path], out: Path, writer: Callable[[Path, list[dict]], Path] = write_jsonl) -> dict:
    """The conversation files next to easy-vqa's: `train_conversations`, `test_followups`,
    `test_two_images`, `test_paraphrases` (keys of `vlm.demo.easyvqa_data()`)."""
    made = {"train_conversations": writer(out / "train_conversations.jsonl",
                                          training_rows(labels_of(files["train_captions"])))}
    for name, rows in test_sets(labels_of(files["test_captions"])).items():
        made[f"test_{name}"] = writer(out / f"test_{name}.jsonl", rows)
    return made
