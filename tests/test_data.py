"""vlm.data: every format loads from small real files, and malformed rows fail with clear errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from PIL import Image
from tiny import random_image

from vlm.data import Example, load_examples, open_example_image
from vlm.errors import VLMError


def write_images(folder: Path, names: list[str]) -> list[Path]:
    paths = []
    for i, name in enumerate(names):
        p = folder / name
        p.parent.mkdir(parents=True, exist_ok=True)
        random_image(i).save(p)
        paths.append(p)
    return paths


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# -- the record ---------------------------------------------------------------------------------
def test_example_target():
    assert Example("caption", None, caption="a cat").target == "a cat"
    assert Example("vqa", None, question="q", answers=["2", "two", "2", "3"]).target == "2"
    conv = [{"role": "user", "content": "<image> hi"}, {"role": "assistant", "content": "one"},
            {"role": "user", "content": "more"}, {"role": "assistant", "content": "two"}]
    assert Example("chat", None, conversation=conv).target == "two"


# -- formats ------------------------------------------------------------------------------------
def test_jsonl_caption_rows_resolve_relative_paths(tmp_path):
    write_images(tmp_path / "imgs", ["a.png", "b.png"])
    data = write_jsonl(tmp_path / "train.jsonl", [{"image": "imgs/a.png", "text": "a red circle"},
                                                  {"image": str(tmp_path / "imgs/b.png"), "caption": "a blue square"}])
    examples = load_examples(str(data))
    assert [e.task for e in examples] == ["caption", "caption"]
    assert [e.caption for e in examples] == ["a red circle", "a blue square"]
    assert examples[0].image == str(tmp_path / "imgs" / "a.png")
    assert examples[0].source == f"{data}:1"
    assert examples.skipped == 0
    image = open_example_image(examples[0])
    assert image.mode == "RGB" and image.size == (40, 32)
    assert list(image.getdata()) == list(random_image(0).getdata())


def test_image_root_overrides_data_folder(tmp_path):
    write_images(tmp_path / "elsewhere", ["a.png"])
    data = write_jsonl(tmp_path / "d.jsonl", [{"image": "a.png", "text": "x"}])
    with pytest.raises(VLMError, match="no such file"):
        load_examples(str(data))
    assert load_examples(str(data), image_root=str(tmp_path / "elsewhere"))[0].image == str(tmp_path / "elsewhere/a.png")


def test_csv_vqa_rows_with_answer_lists(tmp_path):
    write_images(tmp_path, ["a.png", "b.png"])
    path = tmp_path / "vqa.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "question", "answer", "answers", "question_type"])
        w.writerow(["a.png", "what colour?", "red", "", "what color"])
        w.writerow(["b.png", "how many?", "", json.dumps(["2", "2", "two"]), "how many"])
    examples = load_examples(str(path))
    assert [e.task for e in examples] == ["vqa", "vqa"]
    assert examples[0].answers == ["red"] and examples[0].target == "red"
    assert examples[1].answers == ["2", "2", "two"] and examples[1].target == "2"
    assert examples[1].meta["question_type"] == "how many"
    assert examples[1].source == f"{path}:3"  # line 3: header is line 1


def test_coco_captions_json(tmp_path):
    write_images(tmp_path / "train2014", ["1.png", "2.png"])
    data = {"images": [{"id": 10, "file_name": "train2014/1.png"}, {"id": 20, "file_name": "train2014/2.png"}],
            "annotations": [{"id": 1, "image_id": 10, "caption": "A cat."}, {"id": 2, "image_id": 20, "caption": "A dog."},
                            {"id": 3, "image_id": 10, "caption": "A kitten."}]}
    (tmp_path / "captions.json").write_text(json.dumps(data))
    examples = load_examples(str(tmp_path / "captions.json"))
    assert [e.caption for e in examples] == ["A cat.", "A dog.", "A kitten."]
    assert examples[0].answers == ["A cat.", "A kitten."]  # all references of that image
    assert examples[2].image == str(tmp_path / "train2014/1.png")
    with pytest.raises(VLMError, match="not 'vqa' data"):
        load_examples(str(tmp_path / "captions.json"), task="vqa")


def test_karpathy_split_json(tmp_path):
    write_images(tmp_path / "val2014", ["x.png", "y.png", "z.png"])
    images = [
        {"filepath": "val2014", "filename": "x.png", "split": "train", "sentences": [{"raw": "one"}, {"raw": "uno"}]},
        {"filepath": "val2014", "filename": "y.png", "split": "restval", "sentences": [{"raw": "two"}]},
        {"filepath": "val2014", "filename": "z.png", "split": "test", "sentences": [{"raw": "three"}]},
    ]
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"images": images, "dataset": "coco"}))
    train = load_examples(str(path))
    assert [e.caption for e in train] == ["one", "uno", "two"]  # restval counts as train
    test = load_examples(str(path), split="test")
    assert [(e.caption, e.image) for e in test] == [("three", str(tmp_path / "val2014/z.png"))]


def _vqav2(tmp_path: Path, answers=None) -> Path:
    write_images(tmp_path / "val2014", ["COCO_val2014_000000000042.jpg".replace(".jpg", ".png")])
    # Real COCO names end in .jpg: save the PNG bytes under that name too (Pillow sniffs content).
    (tmp_path / "val2014" / "COCO_val2014_000000000042.jpg").write_bytes(
        (tmp_path / "val2014" / "COCO_val2014_000000000042.png").read_bytes())
    questions = {"data_subtype": "val2014", "questions": [
        {"image_id": 42, "question": "What is it?", "question_id": 420},
        {"image_id": 42, "question": "How many?", "question_id": 421}]}
    anns = {"annotations": [
        {"question_id": 420, "image_id": 42, "question_type": "what is", "answer_type": "other",
         "answers": [{"answer": a, "answer_id": i + 1} for i, a in enumerate(answers or ["cat"] * 10)]},
        {"question_id": 421, "image_id": 42, "question_type": "how many", "answer_type": "number",
         "answers": [{"answer": "2", "answer_id": i + 1} for i in range(10)]}]}
    q = tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json"
    q.write_text(json.dumps(questions))
    (tmp_path / "v2_mscoco_val2014_annotations.json").write_text(json.dumps(anns))
    return q


def test_vqav2_annotations_found_beside_questions(tmp_path):
    q = _vqav2(tmp_path, answers=["cat"] * 6 + ["kitten"] * 4)
    examples = load_examples(str(q))
    assert len(examples) == 2 and examples[0].task == "vqa"
    assert examples[0].answers == ["cat"] * 6 + ["kitten"] * 4 and examples[0].target == "cat"
    assert examples[0].image == str(tmp_path / "val2014/COCO_val2014_000000000042.jpg")
    assert examples[1].meta == {"question_id": 421, "image_id": 42, "question_type": "how many", "answer_type": "number"}
    explicit = load_examples(f"{q},{tmp_path / 'v2_mscoco_val2014_annotations.json'}")
    assert [e.question for e in explicit] == ["What is it?", "How many?"]


def test_vqav2_without_annotations_says_how_to_pass_them(tmp_path):
    q = _vqav2(tmp_path)
    (tmp_path / "v2_mscoco_val2014_annotations.json").unlink()
    with pytest.raises(VLMError, match="QUESTIONS.json,ANNOTATIONS.json"):
        load_examples(str(q))


def test_llava_conversation_json(tmp_path):
    write_images(tmp_path, ["a.png"])
    rows = [
        {"id": "1", "image": "a.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A shape."},
            {"from": "human", "value": "Colour?"}, {"from": "gpt", "value": "Red."}]},
        {"id": "2", "conversations": [{"from": "human", "value": "Hello"}, {"from": "gpt", "value": "Hi."}]},
        {"id": "3", "image": "a.png", "conversations": [{"from": "human", "value": "Describe."},
                                                        {"from": "gpt", "value": "Noise."}]},
    ]
    (tmp_path / "llava.json").write_text(json.dumps(rows))
    examples = load_examples(str(tmp_path / "llava.json"))
    assert [e.task for e in examples] == ["chat"] * 3
    assert examples[0].conversation[0] == {"role": "user", "content": "<image>\nWhat is this?"}
    assert examples[0].target == "Red."
    assert examples[1].image is None  # text-only rows are allowed in LLaVA data
    assert examples[2].conversation[0]["content"] == "<image>\nDescribe."  # marker added before the first question
    assert examples[0].meta == {"id": "1"}


def test_hf_save_to_disk_with_embedded_images(tmp_path):
    import datasets

    images = [random_image(i) for i in range(3)]
    ds = datasets.Dataset.from_dict({"image": images, "text": ["one", "two", "three"]},
                                    features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")}))
    datasets.DatasetDict({"train": ds, "validation": ds.select([2])}).save_to_disk(str(tmp_path / "ds"))
    examples = load_examples(str(tmp_path / "ds"))
    assert [e.caption for e in examples] == ["one", "two", "three"]
    assert list(open_example_image(examples[1]).getdata()) == list(images[1].getdata())
    assert [e.caption for e in load_examples(str(tmp_path / "ds"), split="val")] == ["three"]
    with pytest.raises(VLMError, match="no split 'test'.*train, validation"):
        load_examples(str(tmp_path / "ds"), split="test")
    with pytest.raises(VLMError, match="no image column 'img'"):
        load_examples(str(tmp_path / "ds"), image_column="img")


def test_hf_save_to_disk_with_path_column_and_vqa(tmp_path):
    import datasets

    write_images(tmp_path / "ds_imgs", ["a.png"])
    datasets.Dataset.from_dict({"path": [str(tmp_path / "ds_imgs/a.png")], "question": ["q?"], "answer": ["yes"]}
                               ).save_to_disk(str(tmp_path / "ds"))
    [example] = load_examples(str(tmp_path / "ds"), image_column="path")
    assert (example.task, example.question, example.answers, example.image) == (
        "vqa", "q?", ["yes"], str(tmp_path / "ds_imgs/a.png"))


def test_imagefolder_with_metadata(tmp_path):
    write_images(tmp_path / "train", ["a.png", "sub/b.png"])
    write_jsonl(tmp_path / "train" / "metadata.jsonl", [{"file_name": "a.png", "text": "first"},
                                                        {"file_name": "sub/b.png", "text": "second"}])
    examples = load_examples(str(tmp_path))
    assert [(e.caption, Path(e.image).name) for e in examples] == [("first", "a.png"), ("second", "b.png")]


# -- bad input ----------------------------------------------------------------------------------
def test_missing_image_names_file_row_and_path(tmp_path):
    write_images(tmp_path, ["a.png"])
    data = write_jsonl(tmp_path / "d.jsonl", [{"image": "a.png", "text": "x"}, {"image": "gone.png", "text": "y"}])
    with pytest.raises(VLMError) as e:
        load_examples(str(data))
    assert f"{data}:2" in str(e.value) and "gone.png" in str(e.value) and "no such file" in str(e.value)


def test_broken_images_fail_or_are_skipped_and_counted(tmp_path):
    write_images(tmp_path, ["a.png", "b.png"])
    (tmp_path / "text.png").write_text("this is not an image")
    truncated = (tmp_path / "b.png").read_bytes()
    (tmp_path / "trunc.png").write_bytes(truncated[: len(truncated) // 2])
    (tmp_path / "empty.png").write_bytes(b"")
    rows = [{"image": n, "text": n} for n in ["a.png", "text.png", "b.png", "trunc.png", "empty.png"]]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(VLMError) as e:
        load_examples(str(data))
    message = str(e.value)
    assert f"{data}:2" in message and "text.png" in message and "not an image" in message
    assert "and 2 more" in message and "--skip-bad-images" in message
    kept = load_examples(str(data), skip_bad_images=True)
    assert [e.caption for e in kept] == ["a.png", "b.png"]
    assert kept.skipped == 3 and kept.skipped_rows == [f"{data}:2", f"{data}:4", f"{data}:5"]


def test_all_images_bad_is_an_error_even_when_skipping(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"image": "nope.png", "text": "x"}])
    with pytest.raises(VLMError, match="all 1 rows have bad images"):
        load_examples(str(data), skip_bad_images=True)


@pytest.mark.parametrize(
    "row, task, field",
    [
        ({"image": "a.png"}, None, "'text'"),
        ({"image": "a.png", "text": "   "}, None, "'text' is empty"),
        ({"text": "no image"}, None, "'image'"),
        ({"image": "a.png", "question": "q?"}, None, "'answer'"),
        ({"image": "a.png", "answer": "yes"}, "vqa", "'question'"),
        ({"image": "a.png", "question": "q", "answers": []}, None, "'answers'"),
        ({"image": "a.png", "conversations": [{"from": "human", "value": "hi"}]}, None, "no assistant"),
        ({"image": "a.png", "conversations": [{"from": "robot", "value": "hi"}]}, None, "conversations\\[0\\].from"),
        ({"image": "https://x.org/a.png", "text": "t"}, None, "URL"),
    ],
)
def test_malformed_row_names_file_row_and_field(tmp_path, row, task, field):
    write_images(tmp_path, ["a.png"])
    data = write_jsonl(tmp_path / "d.jsonl", [{"image": "a.png", "text": "fine"} if task is None else
                                              {"image": "a.png", "question": "q", "answer": "a"}, row])
    with pytest.raises(VLMError, match=f"d.jsonl:2: .*{field}"):
        load_examples(str(data), task=task)


def test_invalid_json_line_and_csv_row(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"image": "a.png", "text": "x"}\n{"image": \n')
    with pytest.raises(VLMError, match=r"d.jsonl:2: not valid JSON"):
        load_examples(str(tmp_path / "d.jsonl"))
    (tmp_path / "d.csv").write_text("image,text\na.png,x,extra\n")
    with pytest.raises(VLMError, match=r"d.csv:2: more cells"):
        load_examples(str(tmp_path / "d.csv"))
    (tmp_path / "bad.json").write_text('{"images": [1, 2,]}')
    with pytest.raises(VLMError, match=r"bad.json:1: not valid JSON"):
        load_examples(str(tmp_path / "bad.json"))


def test_coco_annotation_with_unknown_image_id(tmp_path):
    data = {"images": [{"id": 1, "file_name": "a.png"}], "annotations": [{"image_id": 1, "caption": "c"},
                                                                         {"image_id": 7, "caption": "d"}]}
    (tmp_path / "c.json").write_text(json.dumps(data))
    with pytest.raises(VLMError, match=r"c.json:2: image_id 7"):
        load_examples(str(tmp_path / "c.json"))


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.jsonl", "", "empty file"),
        ("blank.jsonl", "\n\n", "no examples"),
        ("header.csv", "image,text\n", "no examples"),
        ("list.json", "[]", "no examples"),
        ("weird.json", '{"foo": 1}', "cannot detect the data format"),
        ("data.parquet", "x", "cannot detect the data format"),
        ("annotations.json", '{"annotations": [{"question_id": 1, "answers": []}]}', "VQAv2 annotations file"),
    ],
)
def test_empty_or_undetectable_data(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(VLMError, match=message) as e:
        load_examples(str(tmp_path / name))
    assert name in str(e.value)


def test_bad_arguments(tmp_path):
    with pytest.raises(VLMError, match="no such file"):
        load_examples(str(tmp_path / "missing.jsonl"))
    with pytest.raises(VLMError, match="cannot detect the data format of this folder"):
        load_examples(str(tmp_path))
    write_images(tmp_path, ["a.png"])
    data = write_jsonl(tmp_path / "d.jsonl", [{"image": "a.png", "text": "x"}])
    with pytest.raises(VLMError, match="task must be one of"):
        load_examples(str(data), task="detect")
    with pytest.raises(VLMError, match="image root .*: no such folder"):
        load_examples(str(data), image_root=str(tmp_path / "nope"))


def test_open_example_image_errors_name_the_file(tmp_path):
    bad = tmp_path / "late.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    with pytest.raises(VLMError, match="late.png"):
        open_example_image(Example("caption", str(bad), caption="x"))
    with pytest.raises(VLMError, match="row.jsonl:3: has no image"):
        open_example_image(Example("chat", None, source="row.jsonl:3"))
    assert open_example_image(Example("caption", Image.new("RGBA", (4, 4)), caption="x")).mode == "RGB"
