"""Evaluation metrics: CIDEr-D and BLEU for captions (pycocoevalcap), VQAv2 accuracy.

Captions are scored with the COCO caption evaluation's own scorers (`pycocoevalcap`, extra
`vlm[metrics]`). The COCO evaluation tokenizes with Stanford's Java PTBTokenizer; `tokenize_caption`
is a pure-Python equivalent (lower case, PTB clitic splitting, the same punctuation removed) so no
Java is needed; the tests compare it with the Java tokenizer where Java is installed.

VQA accuracy follows the official VQAv2 evaluation (`vqaEval.py`): the same answer normalisation
(punctuation, number words to digits, articles dropped, contractions restored), and for 10 human
answers the soft score min(#matching humans / 3, 1) averaged over the 10 leave-one-out subsets of
9. With fewer than 10 reference answers the score is exact match (after normalisation) with any
of them. References are normalised like predictions; VQAv2's references are already in that form,
so on VQAv2 this is the official number.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from .errors import VLMError

# --- retrieval (the recall@k itself is train/retrieval.py: it needs the model) ------------------

# LAVIS's BLIP-2 retrieval setting: ITC candidates per query that ITM re-ranks. Here, not beside
# the torch code, so that `vlm eval --help` can show it without importing torch.
K_TEST = 128

# --- captions ----------------------------------------------------------------------------------

# What pycocoevalcap's PTBTokenizer drops after tokenizing (its PUNCTUATIONS list).
PTB_PUNCTUATION = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)
# PTB splits these clitics off the word before them: "don't" -> "do n't", "cat's" -> "cat 's".
_CLITIC = re.compile(r"(?i)(\w)(n't|'s|'re|'ve|'ll|'d|'m)\b")
# PTB also splits these fused words.
_SPLIT_WORDS = re.compile(r"\b(can)(not)\b|\b(gon|wan|got)(na|ta)\b")
# Acronyms keep their periods ("u.s."); words keep inner hyphens, periods and commas between
# digits ("black-and-white", "3.5", "1,000"); "o'clock" stays whole.
_TOKEN = re.compile(r"n't|'(?:s|re|ve|ll|d|m)\b|o'clock|(?:\w\.){2,}|\w+(?:[-.,]\w+)*|\.\.\.|--|\S")
# The Java tokenizer writes brackets as -LRB- etc., then lower-cases them, so (sic) the COCO
# evaluation keeps them as the words "-lrb-"/"-rrb-" (its punctuation list has the upper-case forms).
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "{": "-lcb-", "}": "-rcb-", "[": "-lsb-", "]": "-rsb-"}


def tokenize_caption(text: str) -> str:
    """Lower-case PTB tokens with punctuation removed, joined by spaces (as the COCO evaluation)."""
    text = _CLITIC.sub(r"\1 \2", text.replace("\n", " ").lower())
    text = _SPLIT_WORDS.sub(lambda m: " ".join(g for g in m.groups() if g), text)
    tokens = [_BRACKETS.get(t, t) for t in _TOKEN.findall(text) if t != '"']
    return " ".join(t for t in tokens if t not in PTB_PUNCTUATION)


def caption_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict:
    """Corpus CIDEr-D and BLEU-1..4 of `predictions[i]` against the captions `references[i]`.

    Returns `{"CIDEr": float, "BLEU-1": ..., "BLEU-4": float, "exact_match": float, "per_sample":
    {"CIDEr": [...], "BLEU-4": [...], "exact_match": [...]}}` on the raw 0-1 scale for BLEU and exact
    match and 0-10 for CIDEr (papers print x100). Exact match: the tokenized prediction equals one
    of the tokenized references (for short templated captions such as "a red circle").
    CIDEr's IDF weights come from the references of the whole set, so score a whole test set at
    once, not sample by sample.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} reference lists")
    if not predictions:
        raise VLMError("no predictions to score")
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
    except ImportError:
        raise VLMError("caption metrics need pycocoevalcap: pip install 'vlm[metrics]'") from None
    for i, refs in enumerate(references):
        if not refs:
            raise VLMError(f"sample {i} has no reference captions")
    res = {i: [tokenize_caption(p)] for i, p in enumerate(predictions)}
    gts = {i: [tokenize_caption(r) for r in refs] for i, refs in enumerate(references)}
    bleu, bleu_each = Bleu(4).compute_score(gts, res, verbose=0)
    cider, cider_each = Cider().compute_score(gts, res)
    out = {"CIDEr": float(cider)}
    out.update({f"BLEU-{n + 1}": float(bleu[n]) for n in range(4)})
    exact = [float(res[i][0] in gts[i]) for i in res]
    out["exact_match"] = sum(exact) / len(exact)
    out["per_sample"] = {"CIDEr": [float(x) for x in cider_each], "BLEU-4": [float(x) for x in bleu_each[3]],
                         "exact_match": exact}
    return out


# --- VQA ---------------------------------------------------------------------------------------

# The official evaluation's tables (VQA/PythonEvaluationTools/vqaEvaluation/vqaEval.py).
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
_NUMBERS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = frozenset(["a", "an", "the"])
_PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
# As in vqaEval.py: "(?!<=\d)" is (sic) a lookahead, so this removes every period not before a digit.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")


def _process_punctuation(text: str) -> str:
    out = text
    for p in _PUNCT:
        # A mark touching a space, or any text with a digit-comma-digit, loses the mark outright;
        # otherwise it becomes a space ("black/white" -> "black white").
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out)


def _process_digit_article(text: str) -> str:
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(answer: str) -> str:
    """The official VQAv2 normalisation of an answer ("Two dogs." -> "2 dogs", "The cat" -> "cat")."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(answer))


def vqa_score(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy of one prediction: the soft score for >= 10 human answers, else exact match.

    Soft score (official): for each human answer i, min(1, #other humans who gave the prediction / 3);
    averaged over i. So 3+ matching humans of 10 give 1.0, 2 give 0.6, 1 gives 0.3.
    """
    if not answers:
        raise ValueError("vqa_score needs at least one reference answer")
    pred = normalize_answer(prediction)
    refs = [normalize_answer(a) for a in answers]
    if len(refs) < 10:
        return float(pred in refs)
    matches = [r == pred for r in refs]
    total = sum(matches)
    # Leaving human i out removes their own match (if any) from the count.
    return sum(min(1.0, (total - m) / 3.0) for m in matches) / len(refs)


def vqa_accuracy(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> dict:
    """Mean VQA accuracy over a set (0-1), with the per-sample scores."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} answer lists")
    if not predictions:
        raise VLMError("no predictions to score")
    scores = [vqa_score(p, a) for p, a in zip(predictions, answers)]
    return {"accuracy": sum(scores) / len(scores), "per_sample": scores}
