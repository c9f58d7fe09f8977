"""Scorers on hand-worked cases; every expected number is derived in a comment."""

from __future__ import annotations

import pytest

from vtprune.eval.benchmarks.samples import Sample
from vtprune.eval.benchmarks.scoring import MAIN_METRICS, SCORERS, score
from vtprune.eval.benchmarks.scoring_choice import extract_choice, first_letter, parse_scienceqa
from vtprune.eval.benchmarks.scoring_vqa import normalize_gqa_answer, normalize_vqa_answer, vqa_accuracy
from vtprune.eval.benchmarks.scoring_yesno import parse_mme, parse_yes_no_lenient, parse_yes_no_strict


def pope(sid, label, split="random"):
    return Sample("pope", sid, "q", "q", [label], metadata={"split": split})


def mme(sid, answer, image, subtask="OCR"):
    return Sample("mme", sid, "q", "q", [answer], group=f"{subtask}/{image}", metadata={"subtask": subtask})


def choice(benchmark, sid, answer, choices, group=None, **meta):
    return Sample(benchmark, sid, "q", "q", [answer], choices=list(choices), group=group, metadata=meta)


def test_registry_matches_readers_and_main_metrics():
    from vtprune.eval.benchmarks.readers import READERS

    assert set(SCORERS) == set(READERS) == set(MAIN_METRICS)


# --- POPE ---


def test_pope_strict_counts():
    samples = [pope("1", "yes"), pope("2", "yes"), pope("3", "yes"), pope("4", "no")]
    preds = {"1": "Yes", "2": " yes ", "3": "no", "4": "yes"}
    r = score("pope", samples, preds)
    m = r["splits"]["random"]
    # parsed: yes, yes, no, yes -> TP=2 (1, 2), FN=1 (3), FP=1 (4), TN=0
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (2, 1, 0, 1)
    assert m["accuracy"] == pytest.approx(2 / 4)  # 1 and 2 right
    assert m["precision"] == pytest.approx(2 / 3)  # TP / (TP + FP)
    assert m["recall"] == pytest.approx(2 / 3)  # TP / (TP + FN)
    assert m["f1"] == pytest.approx(2 / 3)  # 2PR / (P + R) with P = R
    assert m["yes_ratio"] == pytest.approx(3 / 4)
    assert r["parser"] == "strict" and r["main_metric"] == "mean_f1" and r["benchmark"] == "pope"


def test_pope_parser_choice_changes_the_score_and_is_recorded():
    samples = [pope("1", "yes"), pope("2", "no"), pope("3", "no"), pope("4", "yes")]
    preds = ["Yes, there is a dog.", "There is no cat.", "No", "I think so"]
    strict = score("pope", samples, preds, parser="strict")["splits"]["random"]
    # strict: other, other, no, other -> only sample 3 right; the 3 "other"s count as wrong.
    assert strict["accuracy"] == 0.25 and strict["other"] == 3 and strict["tp"] == 0
    lenient = score("pope", samples, preds, parser="lenient")
    # lenient (LLaVA): yes, no (contains "no"), no, yes (no negation word) -> all 4 right.
    assert lenient["splits"]["random"]["accuracy"] == 1.0 and lenient["parser"] == "lenient"
    with pytest.raises(ValueError, match="unknown POPE parser"):
        score("pope", samples, preds, parser="fuzzy")


def test_pope_mean_f1_over_splits():
    samples = [
        pope("r1", "yes"),
        pope("r2", "no"),
        pope("a1", "yes", "adversarial"),
        pope("a2", "no", "adversarial"),
    ]
    r = score("pope", samples, ["yes", "no", "yes", "yes"])
    # random: TP=1 TN=1 -> F1 = 1. adversarial: TP=1 FP=1 -> P = 1/2, R = 1, F1 = 2/3.
    assert r["splits"]["adversarial"]["f1"] == pytest.approx(2 / 3)
    assert r["mean_f1"] == pytest.approx((1 + 2 / 3) / 2)
    assert r["mean_accuracy"] == pytest.approx((1 + 0.5) / 2)


def test_yes_no_parsers():
    assert parse_yes_no_strict("YES") == "yes" and parse_yes_no_strict("yes.") == "other"
    assert parse_yes_no_lenient("Yes. There is no dog.") == "yes"  # only the first sentence counts
    assert parse_yes_no_lenient("It is not, sadly") == "no"
    assert parse_yes_no_lenient("NO") == "yes"  # LLaVA's case-sensitive word test, kept on purpose


# --- MME ---


def test_mme_acc_plus_with_one_image_half_right():
    samples = [
        mme("a0", "yes", "img1"),
        mme("a1", "no", "img1"),
        mme("b0", "yes", "img2"),
        mme("b1", "no", "img2"),
        mme("c0", "yes", "img3", "code_reasoning"),
        mme("c1", "no", "img3", "code_reasoning"),
    ]
    preds = ["Yes", "No.", "yes", "yes", "no", "Nope"]
    r = score("mme", samples, preds)
    ocr = r["subtasks"]["OCR"]
    # OCR: 3 of 4 answers right -> acc 75; img1 fully right, img2 half right -> acc+ 1/2 = 50.
    assert (ocr["acc"], ocr["acc_plus"], ocr["score"]) == (75.0, 50.0, 125.0)
    # code_reasoning: "no" wrong, "Nope" parses as no (prefix) and is right -> acc 50, acc+ 0.
    assert r["subtasks"]["code_reasoning"]["score"] == 50.0
    assert (r["perception"], r["cognition"], r["total"]) == (125.0, 50.0, 175.0)
    assert r["parser"] == "mme_prefix"


def test_mme_parser():
    assert parse_mme("Yes.") == "yes"
    assert parse_mme("No, there is none") == "no"
    assert parse_mme("yes, but not really") == "yes"  # the first 4 chars decide
    assert parse_mme("The answer is yes") == "other"  # MME does not search further


# --- VQA (TextVQA) and GQA ---


@pytest.mark.parametrize(
    "matches, expected",
    [
        # Each of the 10 leave-one-out subsets scores min(1, matches_in_subset / 3).
        (0, 0.0),
        (1, 0.3),  # 1 subset sees 0 matches, 9 see 1: 9 * (1/3) / 10
        (2, 0.6),  # 2 subsets see 1 match, 8 see 2: (2/3 + 16/3) / 10
        (3, 0.9),  # 3 subsets see 2, 7 see 3: (3 * 2/3 + 7) / 10
        (4, 1.0),  # every subset sees >= 3
    ],
)
def test_vqa_accuracy_leave_one_out(matches, expected):
    answers = ["two"] * matches + ["three"] * (10 - matches)
    assert vqa_accuracy("2", answers) == pytest.approx(expected)


@pytest.mark.parametrize(
    "raw, normalised",
    [
        ("Two", "2"),  # number words as digits
        ("The cat.", "cat"),  # articles and the final period dropped
        ("3.5", "3.5"),  # a decimal point is kept
        ("1,000", "1000"),  # digit,digit: punctuation removed without a space
        ("hot-dog", "hot dog"),  # a glued mark separates words
        ("hot - dog", "hot dog"),  # a spaced mark is removed
        ("dont", "don't"),  # contractions restored
        ("couldnt've", "couldn't've"),
        ("yall'll", "y'all'll"),
        ("Yes!\n", "yes"),
        ("a man's hat", "man's hat"),  # apostrophes are not punctuation here
    ],
)
def test_evalai_normaliser(raw, normalised):
    assert normalize_vqa_answer(raw) == normalised


def test_textvqa_score_mean_over_samples():
    samples = [
        Sample("textvqa", "1", "q", "q", ["nous"] * 10),
        Sample("textvqa", "2", "q", "q", ["2"] * 2 + ["3"] * 8),
    ]
    r = score("textvqa", samples, {"1": "Nous.", "2": "two"})
    # sample 1: all 10 match -> 1.0; sample 2: 2 matches -> 0.6; mean 0.8
    assert r["accuracy"] == pytest.approx(0.8) and r["parser"] == "evalai_vqa"


def test_gqa_exact_match():
    samples = [Sample("gqa", str(i), "q", "q", [a]) for i, a in enumerate(["left", "no", "white"])]
    r = score("gqa", samples, ["Left.", "no, it is not", "White"])
    assert r["accuracy"] == pytest.approx(2 / 3)  # "no, it is not" is not an exact match
    assert normalize_gqa_answer("  T-shirt!  ") == "tshirt"


# --- multiple choice ---


@pytest.mark.parametrize(
    "text, expected",
    [
        ("B", "B"),
        ("(C)", "C"),
        ("B. dog", "B"),
        ("C) bird", "C"),
        ("The answer is B.", "B"),
        ("Answer: (D)", "D"),
        ("I think it is a bird", "C"),  # option text
        ("A dog", "B"),  # "A" as an article is not option A; "dog" matches B
        ("E", None),  # not an option
        ("no idea", None),
        ("", None),
    ],
)
def test_extract_choice(text, expected):
    assert extract_choice(text, ["cat", "dog", "bird", "fish"]) == expected


def test_extract_choice_prefers_the_longest_matching_option():
    assert extract_choice("It is dark red", ["red", "dark red"]) == "B"
    assert extract_choice("2 apples", ["12", "2"]) == "B"  # word boundaries: "12" is not in "2 apples"


def test_scienceqa_letter_match():
    assert parse_scienceqa("A", ["x", "y"]) == "A"
    assert parse_scienceqa("B.", ["x", "y"]) == "B"
    assert parse_scienceqa("B. y", ["x", "y"]) == "B"
    assert parse_scienceqa("The answer is A.", ["x", "y"]) == "A"
    assert parse_scienceqa("y", ["x", "y"]) is None  # option text alone is not accepted
    assert parse_scienceqa("C", ["x", "y"]) is None
    samples = [
        choice("scienceqa", "1", "A", "xy", subject="natural science"),
        choice("scienceqa", "2", "B", "xy", subject="natural science"),
        choice("scienceqa", "3", "B", "xyz", subject="social science"),
    ]
    r = score("scienceqa", samples, ["A.", "y", "B"])
    # 1 right, 2 unparsable (wrong), 3 right -> 2/3; natural 1/2, social 1/1
    assert r["accuracy"] == pytest.approx(2 / 3) and r["unparsed"] == 1
    assert r["by_subject"] == {"natural science": 0.5, "social science": 1.0}


def test_mmbench_circular_evaluation():
    samples = [
        # question 0: original + 1 rotated copy, both answered right
        choice("mmbench", "0", "A", ["red", "blue"], group="0", category="color"),
        choice("mmbench", "1000000", "B", ["blue", "red"], group="0", category="color", circular_copy=True),
        # question 1: original right, one of its 3 rotated copies wrong
        choice("mmbench", "1", "C", "1234", group="1", category="count"),
        choice("mmbench", "1000001", "B", "2341", group="1", category="count", circular_copy=True),
        choice("mmbench", "2000001", "A", "3412", group="1", category="count", circular_copy=True),
        choice("mmbench", "3000001", "D", "4123", group="1", category="count", circular_copy=True),
    ]
    preds = ["A", "B. red", "C", "B", "A", "A"]  # last copy should be D
    r = score("mmbench", samples, preds)
    assert r["n_questions"] == 2 and r["n"] == 6
    assert r["circular_accuracy"] == 0.5  # only question 0 survives all rotations
    assert r["vanilla_accuracy"] == 1.0  # both originals right
    assert r["by_category"] == {"color": 1.0, "count": 0.0}
    assert r["main_metric"] == "circular_accuracy" and r["parser"] == "extract"


def test_seedbench_parsers():
    samples = [
        choice("seedbench", "1", "C", "wxyz", question_type="Scene"),
        choice("seedbench", "2", "A", "wxyz"),
    ]
    preds = ["The answer is C.", "A"]
    assert score("seedbench", samples, preds)["accuracy"] == 1.0
    strict = score("seedbench", samples, preds, parser="first_letter")
    assert strict["accuracy"] == 0.5 and strict["unparsed"] == 1  # "T" is not an option
    assert first_letter("  d", ["w", "x", "y", "z"]) is None  # lower case is not a letter answer


# --- score() contract ---


def test_score_input_errors():
    samples = [Sample("gqa", "1", "q", "q", ["yes"])]
    with pytest.raises(ValueError, match="unknown benchmark"):
        score("vqav9", samples, ["yes"])
    with pytest.raises(ValueError, match="samples come from"):
        score("pope", samples, ["yes"])
    with pytest.raises(ValueError, match="1 samples have no prediction"):
        score("gqa", samples, {"2": "yes"})
    with pytest.raises(ValueError, match="got 2 predictions for 1 samples"):
        score("gqa", samples, ["yes", "no"])
    with pytest.raises(ValueError, match="no samples"):
        score("gqa", [], [])
    with pytest.raises(ValueError, match="no gold answer"):
        score("mmbench", [Sample("mmbench", "1", "q", "q", [], choices=["a", "b"])], ["A"])
