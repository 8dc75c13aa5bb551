"""VQAv2: a questions file plus its annotations file.

Give the questions file; the annotations file is found beside it (the one `*annotations*.json`
in the same folder, preferring one that names the same subset, e.g. `train2014`). To be explicit,
give both: `questions.json,annotations.json`. Images are COCO's:
`<image_root>/COCO_<subset>_<image_id:012d>.jpg` or `<image_root>/<subset>/COCO_...`; a question
with its own `image` field uses that path instead.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import VLMError
from .common import check_task, read_json, require_text, resolve_image_path, row_error
from .records import Example

KEEP = ("question_id", "image_id", "question_type", "answer_type", "multiple_choice_answer")


def is_vqav2_questions(data) -> bool:
    return isinstance(data, dict) and isinstance(data.get("questions"), list)


def is_vqav2_annotations(data) -> bool:
    anns = data.get("annotations") if isinstance(data, dict) else None
    return isinstance(anns, list) and any(isinstance(a, dict) and "answers" in a for a in anns[:10])


def find_annotations(questions_path: Path, subset: str | None) -> Path:
    """The annotations file beside a questions file (see module doc), or a `VLMError` saying how to pass it."""
    candidates = sorted(
        p for p in questions_path.parent.glob("*.json") if "annotation" in p.name.lower() and p != questions_path
    )
    if subset and len(candidates) > 1:
        candidates = [p for p in candidates if subset in p.name] or candidates
    if len(candidates) == 1:
        return candidates[0]
    found = f"found {len(candidates)}: {', '.join(p.name for p in candidates)}" if candidates else "found none"
    raise VLMError(
        f"{questions_path}: VQAv2 questions need their annotations file (with the answers) and {found} beside it; "
        f"pass both as QUESTIONS.json,ANNOTATIONS.json"
    )


def read_vqav2(
    questions: dict, questions_path: Path, annotations_path: Path | None, task: str | None, image_root: Path
) -> list[Example]:
    """One `Example` per question, with all 10 human answers (the soft-score references)."""
    check_task(task, ["vqa"], questions_path, "VQAv2")
    subset = questions.get("data_subtype")
    annotations_path = annotations_path or find_annotations(questions_path, subset)
    annotations = read_json(annotations_path)
    if not is_vqav2_annotations(annotations):
        raise VLMError(f"{annotations_path}: not a VQAv2 annotations file (no 'annotations' with 'answers')")
    answers_of = {}
    for i, ann in enumerate(annotations["annotations"], start=1):
        if not isinstance(ann, dict) or "question_id" not in ann:
            raise row_error(f"{annotations_path}:{i}", "missing field 'question_id'")
        answers_of[ann["question_id"]] = (i, ann)
    examples = []
    for i, q in enumerate(questions["questions"], start=1):
        source = f"{questions_path}:{i}"  # row number = 1-based position in "questions"
        question = require_text(q, "question", source)
        if "question_id" not in q:
            raise row_error(source, "missing field 'question_id'")
        if q["question_id"] not in answers_of:
            raise row_error(source, f"question_id {q['question_id']} has no entry in {annotations_path.name}")
        ann_row, ann = answers_of[q["question_id"]]
        answers = ann.get("answers")
        if not isinstance(answers, list) or not answers:
            raise row_error(f"{annotations_path}:{ann_row}", "field 'answers' must be a non-empty list")
        answers = [require_text(a, "answer", f"{annotations_path}:{ann_row} answers[{j}]") for j, a in enumerate(answers)]
        image = _image_path(q, ann, subset, image_root, source)
        meta = {k: v for k, v in {**ann, **q}.items() if k in KEEP}
        examples.append(Example("vqa", image, question=question, answers=answers, source=source, meta=meta))
    return examples


def _image_path(q: dict, ann: dict, subset: str | None, image_root: Path, source: str) -> str:
    if "image" in q:
        return resolve_image_path(q["image"], image_root, source)
    image_id = q.get("image_id", ann.get("image_id"))
    if not isinstance(image_id, int):
        raise row_error(source, "missing field 'image_id' (or 'image')")
    if not subset:
        raise row_error(source, "the questions file has no 'data_subtype' (e.g. train2014) to name COCO images by")
    name = f"COCO_{subset}_{image_id:012d}.jpg"
    # COCO is unpacked either flat in the root or in a <subset>/ folder; take whichever exists.
    for candidate in (image_root / name, image_root / subset / name):
        if candidate.exists():
            return str(candidate.resolve())
    return str((image_root / name).resolve())
