"""vlm.metrics against values computed by hand (and the COCO Java tokenizer where Java exists)."""

from __future__ import annotations

import math
import os
import shutil
import subprocess

import pytest

from vlm.metrics import PTB_PUNCTUATION, caption_scores, normalize_answer, tokenize_caption, vqa_accuracy, vqa_score

# -- captions -----------------------------------------------------------------------------------


def test_bleu4_of_identical_sentence_is_one():
    s = caption_scores(["a man riding a wave on a surfboard"], [["a man riding a wave on a surfboard"]])
    assert s["BLEU-4"] == pytest.approx(1.0, abs=1e-6)
    assert s["BLEU-1"] == pytest.approx(1.0, abs=1e-6)


def test_bleu4_by_hand_modified_precisions():
    # hyp: the cat sat on the mat / ref: the cat sat on a mat (same length: brevity penalty 1)
    # p1 = 5/6 ("the" clipped to 1), p2 = 3/5, p3 = 2/4, p4 = 1/3  ->  BLEU-4 = (1/12) ** (1/4)
    s = caption_scores(["The cat sat on the mat."], [["the cat sat on a mat"]])
    assert s["BLEU-1"] == pytest.approx(5 / 6, rel=1e-6)
    assert s["BLEU-4"] == pytest.approx((5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25, rel=1e-6)


def test_bleu4_brevity_penalty_by_hand():
    # 4-word hypothesis, all n-grams match, reference has 6 words: BP = exp(1 - 6/4)
    s = caption_scores(["the cat sat on"], [["the cat sat on the mat"]])
    assert s["BLEU-4"] == pytest.approx(math.exp(1 - 6 / 4), rel=1e-6)


def test_bleu_uses_closest_reference_length():
    # refs of length 4 and 9: the closest to the 4-word hypothesis is 4, so no brevity penalty
    s = caption_scores(["the cat sat on"], [["the cat sat on", "a very long reference caption about a cat"]])
    assert s["BLEU-4"] == pytest.approx(1.0, abs=1e-6)


def test_cider_by_hand():
    # Two images. CIDEr-D per image = 10 * mean over n=1..4 of the clipped tf-idf cosine, with a
    # Gaussian length penalty (zero here: equal lengths). Image 1: hypothesis == its one reference,
    # which has 1..4-grams, so each n gives cosine 1 -> 10. Image 2: nothing shared -> 0.
    # A 3-word identical caption has no 4-grams: n=4 gives 0, so 10 * 3/4 = 7.5.
    s = caption_scores(["a cat on a mat", "green trees"], [["a cat on a mat"], ["two red buses"]])
    assert s["per_sample"]["CIDEr"] == pytest.approx([10.0, 0.0])
    assert s["CIDEr"] == pytest.approx(5.0)
    s = caption_scores(["a dog runs", "x"], [["a dog runs"], ["y"]])
    assert s["per_sample"]["CIDEr"] == pytest.approx([7.5, 0.0])


def test_cider_length_penalty_by_hand():
    # Image 1: hypothesis "a cat" vs reference "a cat sits": only 1- and 2-grams exist in the
    # hypothesis. idf of every reference n-gram is log(2) (each appears in 1 of 2 images), so
    # n=1: hyp (a, cat) . ref (a, cat, sits) = 2 / (sqrt2 * sqrt3);  n=2: (a cat) . (a cat, cat sits) = 1 / sqrt2
    # length penalty exp(-(2-3)^2 / (2 * 6^2)); n=3,4: hypothesis vector empty -> 0.
    s = caption_scores(["a cat", "zzz"], [["a cat sits"], ["qqq"]])
    penalty = math.exp(-1 / 72)
    expected = 10 * (2 / math.sqrt(6) + 1 / math.sqrt(2)) * penalty / 4
    assert s["per_sample"]["CIDEr"][0] == pytest.approx(expected, rel=1e-6)


def test_caption_exact_match_after_tokenizing():
    s = caption_scores(["A red circle.", "a red circle and a blue one", "a blue triangle"],
                       [["a red circle"], ["a red circle"], ["a green triangle", "a blue triangle"]])
    assert s["per_sample"]["exact_match"] == [1.0, 0.0, 1.0]
    assert s["exact_match"] == pytest.approx(2 / 3)


def test_tokenizer_lowercases_and_drops_punctuation():
    assert tokenize_caption("A Man, riding a WAVE.") == "a man riding a wave"
    assert tokenize_caption("Two dogs don't like the cat's toy!") == "two dogs do n't like the cat 's toy"
    assert tokenize_caption("a black-and-white photo (old)") == "a black-and-white photo -lrb- old -rrb-"
    # punctuation-only differences do not change the score
    assert caption_scores(["A cat, sitting."], [["a cat sitting"]])["BLEU-3"] == pytest.approx(1.0, abs=1e-6)


SENTENCES = [
    "A man riding a wave on top of a surfboard.",
    "Two dogs don't like the cat's toy!",
    "A black-and-white photo of 3.5 cats, 1,000 birds (maybe).",
    'The man\'s hat is "red"; it\'s nice -- really...',
    "A CAT sitting on a sofa: yes? no!",
    "He said 'hello' to the U.S. team.",
    "a man with a 10-speed bike & a dog's leash",
    "cannot won't gonna",
    "it's 5 o'clock",
    "A plate w/ food",
    "a dog...running",
]


@pytest.mark.skipif(shutil.which("java") is None, reason="needs Java for the reference tokenizer")
def test_tokenizer_matches_cocos_java_ptb_tokenizer(tmp_path):
    import pycocoevalcap

    jar = os.path.join(list(pycocoevalcap.__path__)[0], "tokenizer", "stanford-corenlp-3.4.1.jar")
    (tmp_path / "s.txt").write_text("\n".join(SENTENCES))
    cmd = ["java", "-cp", jar, "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase", "s.txt"]
    lines = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, check=True, timeout=120).stdout.split("\n")
    java = [" ".join(w for w in line.rstrip().split(" ") if w not in PTB_PUNCTUATION) for line in lines[: len(SENTENCES)]]
    assert [tokenize_caption(s) for s in SENTENCES] == java


# -- VQA ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, normalized",
    [
        ("Two", "2"),
        ("two dogs.", "2 dogs"),
        ("The cat", "cat"),
        ("a red one", "red 1"),
        ("none", "0"),
        ("dont know", "don't know"),
        ("yes!", "yes"),
        ("black/white", "black white"),  # a mark not touching a space becomes a space
        ("black / white", "black  white".replace("  ", " ")),  # touching a space: removed
        ("1,000", "1000"),  # digit,digit: commas removed
        ("3.5", "3.5"),  # a period before a digit stays
        ("  Fire hydrant\n", "fire hydrant"),
    ],
)
def test_official_answer_normalization(raw, normalized):
    assert normalize_answer(raw) == normalized


def test_vqa_soft_score_subset_averaging_by_hand():
    # 10 humans, k of them gave the predicted answer. Leaving human i out:
    #   a matching human leaves k-1 matches, a non-matching one leaves k; score min(1, m/3) each.
    # k=2: (2 * 1/3 + 8 * 2/3) / 10 = 0.6;  k=1: (1 * 0 + 9 * 1/3) / 10 = 0.3;  k=3: (3 * 2/3 + 7) / 10 = 0.9
    answers = ["cat", "cat"] + ["dog"] * 8
    assert vqa_score("cat", answers) == pytest.approx(0.6)
    assert vqa_score("cat", ["cat"] + ["dog"] * 9) == pytest.approx(0.3)
    assert vqa_score("cat", ["cat"] * 3 + ["dog"] * 7) == pytest.approx(0.9)
    assert vqa_score("cat", ["cat"] * 4 + ["dog"] * 6) == pytest.approx(1.0)
    assert vqa_score("dog", answers) == pytest.approx(1.0)
    assert vqa_score("bird", answers) == 0.0


def test_vqa_score_normalizes_both_sides():
    assert vqa_score("Two.", ["2"] * 3 + ["3"] * 7) == pytest.approx(0.9)
    assert vqa_score("the Cat", ["cat", "a cat"] + ["dog"] * 8) == pytest.approx(0.6)


def test_vqa_exact_match_with_fewer_than_ten_answers():
    assert vqa_score("Yes", ["yes"]) == 1.0
    assert vqa_score("no", ["yes"]) == 0.0
    assert vqa_score("a dog", ["cat", "dog"]) == 1.0


def test_vqa_accuracy_mean():
    out = vqa_accuracy(["cat", "yes", "no"], [["cat", "cat"] + ["dog"] * 8, ["yes"], ["yes"]])
    assert out["per_sample"] == pytest.approx([0.6, 1.0, 0.0])
    assert out["accuracy"] == pytest.approx(1.6 / 3)
