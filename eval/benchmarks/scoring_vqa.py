"""Short-answer scoring: the EvalAI / VQA answer normaliser and accuracy (TextVQA), and GQA.

The normaliser reproduces the official VQA evaluation's ``processPunctuation`` then
``processDigitArticle`` steps: punctuation removed or turned into spaces, periods dropped
unless they are decimal points, number words written as digits, articles dropped, and
apostrophe-less contractions restored ("dont" -> "don't").
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping, Sequence

from .samples import Sample, align_predictions

_PUNCTUATION = (
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
)
# The official pattern "(?!<=\d)(\.)(?!\d)" has a malformed look-behind that never fires, so in
# effect it removes every period not followed by a digit; written here as what it does.
_PERIOD = re.compile(r"\.(?!\d)")
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
_NUMBERS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
_NUMBERS["none"] = "0"
_ARTICLES = frozenset(("a", "an", "the"))

# Contractions as the official table restores them. A single-apostrophe form is matched with
# its apostrophe dropped; a double one with any ONE apostrophe dropped (the official keys).
# Forms whose apostrophe-less spelling is a real word (he'll -> hell, we're -> were) are absent.
_SINGLE = (
    "ain't aren't can't could've couldn't didn't doesn't don't hadn't hasn't haven't he'd he's how'd "
    "how'll how's isn't it'd it'll ma'am mightn't might've mustn't must've needn't not've o'clock oughtn't "
    "shan't should've shouldn't somebody'll somebody's someone'd someone'll someone's something'd "
    "something'll that's there'd there're there's they'd they'll they're they've 'twas wasn't we've "
    "weren't what'll what're what's what've when's where'd where's where've who'd who'll who's who've "
    "why'll why're why's won't would've wouldn't y'all you'd you'll you're you've"
).split()
_DOUBLE = (
    "couldn't've hadn't've he'd've it'd've mightn't've she'd've shouldn't've somebody'd've someone'd've "
    "something'd've there'd've they'd've we'd've who'd've wouldn't've y'all'll y'all'd've you'd've 'ow's'at"
).split()


def _contraction_table() -> dict[str, str]:
    table = {c.replace("'", ""): c for c in _SINGLE}
    for c in _DOUBLE:
        for i, ch in enumerate(c):
            if ch == "'":
                table[c[:i] + c[i + 1 :]] = c
    return table


_CONTRACTIONS = _contraction_table()


def normalize_vqa_answer(text: str) -> str:
    """Normalise an answer as the official VQA / EvalAI evaluation does.

    Example:
        >>> normalize_vqa_answer("Two dogs!")
        '2 dogs'
        >>> normalize_vqa_answer("The dont-walk sign.")
        "don't walk sign"
    """
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _digits_articles(_punctuation(text))


def _punctuation(text: str) -> str:
    out = text
    # Official rule: a mark touching a space (or any text with a 1,000-style number) is deleted,
    # otherwise it separates words ("dont-walk" -> "dont walk").
    glued = _DIGIT_COMMA_DIGIT.search(text) is not None
    for p in _PUNCTUATION:
        if glued or f"{p} " in text or f" {p}" in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out)


def _digits_articles(text: str) -> str:
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy: mean over leave-one-out subsets of the answers of ``min(1, matches / 3)``.

    Example:
        >>> # 2 of 10 humans said "red": the 2 subsets without a "red" voter see 1 match (1/3),
        >>> # the 8 others see 2 (2/3): (2 * 1/3 + 8 * 2/3) / 10 = 0.6
        >>> round(vqa_accuracy("Red.", ["red"] * 2 + ["blue"] * 8), 6)
        0.6
    """
    pred = normalize_vqa_answer(prediction)
    gold = [normalize_vqa_answer(a) for a in answers]
    if len(gold) < 2:
        return float(bool(gold) and pred == gold[0])
    total_matches = sum(g == pred for g in gold)
    # Leaving out answer i removes one match exactly when answer i itself matches.
    scores = [min(1.0, (total_matches - (g == pred)) / 3) for g in gold]
    return sum(scores) / len(scores)


def score_textvqa(samples: Sequence[Sample], predictions: Mapping[str, str] | Sequence[str]) -> dict:
    """TextVQA (or any 10-answer VQA) accuracy in [0, 1].

    Example:
        >>> s = Sample("textvqa", "1", "q", "q", ["stop"] * 10)
        >>> score_textvqa([s], {"1": "STOP"})["accuracy"]
        1.0
    """
    preds = align_predictions(samples, predictions)
    acc = sum(vqa_accuracy(p, s.answers) for s, p in zip(samples, preds)) / len(samples)
    return {"parser": "evalai_vqa", "n": len(samples), "accuracy": acc}


def normalize_gqa_answer(text: str) -> str:
    """Lower-case, drop punctuation, collapse spaces (GQA's exact-match preparation).

    Example:
        >>> normalize_gqa_answer(" Yes. ")
        'yes'
    """
    kept = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return " ".join(kept.split())


def score_gqa(samples: Sequence[Sample], predictions: Mapping[str, str] | Sequence[str]) -> dict:
    """GQA accuracy in [0, 1]: exact match after :func:`normalize_gqa_answer`.

    Example:
        >>> s = Sample("gqa", "1", "q", "q", ["left"])
        >>> score_gqa([s], ["Left."])["accuracy"]
        1.0
    """
    preds = align_predictions(samples, predictions)
    hits = sum(normalize_gqa_answer(p) == normalize_gqa_answer(s.answer) for s, p in zip(samples, preds))
    return {"parser": "gqa_exact_match", "n": len(samples), "accuracy": hits / len(samples)}
