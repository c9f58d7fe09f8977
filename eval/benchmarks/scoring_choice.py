"""Multiple-choice scoring: answer-letter parsers, ScienceQA-IMG, SEED-Bench, and MMBench circular."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence

from .samples import Sample, align_predictions, letters

_BARE = re.compile(r"\(?([A-Z])\)?[.:]?")
_LEADING = re.compile(r"\(?([A-Z])[).:,](?:\s|$)")
_ANSWER_IS = re.compile(r"(?i:answer)(?:\s+is)?\s*:?\s*(?:(?i:option)\s+)?\(?([A-Z])\)?(?![A-Za-z])")
_LONE_LETTER = re.compile(r"(?<![A-Za-z'])([A-Z])(?![A-Za-z'])")
_SQA_ANSWER_IS = re.compile(r"The answer is ([A-Z])\.")


def extract_choice(text: str, choices: Sequence[str]) -> str | None:
    """The option letter an answer picks, or ``None`` (no GPT judge: rules only).

    Tried in order: a bare letter (``B``, ``(B)``, ``B.``); a leading ``B.``/``B)``/``B:``;
    ``answer is B``/``Answer: B``; the one option whose text the answer contains (a shorter option
    inside a longer matching one is ignored); the one capital letter standing alone.

    Example:
        >>> choices = ["red", "dark red", "blue"]
        >>> extract_choice("(B)", choices), extract_choice("It is dark red.", choices)
        ('B', 'B')
        >>> extract_choice("A dog.", choices) is None
        True
    """
    valid = letters(len(choices))
    text = text.strip()
    for find in (_BARE.fullmatch, _LEADING.match, _ANSWER_IS.search):
        m = find(text)
        if m and m.group(1) in valid:
            return m.group(1)
    by_text = _match_option_text(text, choices)
    if by_text is not None:
        return by_text
    # "A" followed by a lower-case word is the article, not option A.
    lone = {m.group(1) for m in _LONE_LETTER.finditer(text) if not _is_article(text, m)}
    lone &= set(valid)
    return lone.pop() if len(lone) == 1 else None


def _is_article(text: str, m: re.Match) -> bool:
    return m.group(1) == "A" and re.match(r"\s+[a-z]", text[m.end() :]) is not None


def _match_option_text(text: str, choices: Sequence[str]) -> str | None:
    lowered = text.lower()
    found = {}
    for letter, choice in zip(letters(len(choices)), choices):
        option = choice.strip().lower().rstrip(".")
        if option and re.search(rf"(?<!\w){re.escape(option)}(?!\w)", lowered):
            found[letter] = option
    # "red" also matches inside "dark red"; keep only options not contained in another match.
    best = [k for k, v in found.items() if not any(v != w and v in w for w in found.values())]
    return best[0] if len(best) == 1 else None


def first_letter(text: str, choices: Sequence[str]) -> str | None:
    """lmms-eval's SEED-Bench parsing: the first character of the stripped answer, if a valid letter.

    Example:
        >>> first_letter(" C. a bird", ["x", "y", "z"]), first_letter("The answer is C", ["x", "y", "z"])
        ('C', None)
    """
    head = text.strip()[:1]
    return head if head in letters(len(choices)) else None


def parse_scienceqa(text: str, choices: Sequence[str]) -> str | None:
    """LLaVA's ScienceQA parsing: an exact letter, a leading ``X.``, or ``The answer is X.``.

    Example:
        >>> parse_scienceqa("B", ["x", "y"]), parse_scienceqa("B. y", ["x", "y"]), parse_scienceqa("y", ["x", "y"])
        ('B', 'B', None)
    """
    valid = letters(len(choices))
    text = text.strip()
    if text in valid:
        return text
    if len(text) >= 2 and text[0] in valid and text[1] == "." and (len(text) == 2 or text[2].isspace()):
        return text[0]
    found = _SQA_ANSWER_IS.findall(text)
    return found[0] if len(found) == 1 and found[0] in valid else None


CHOICE_PARSERS: dict[str, Callable[[str, Sequence[str]], str | None]] = {
    "extract": extract_choice,
    "first_letter": first_letter,
    "scienceqa": parse_scienceqa,
}


def choice_hits(
    samples: Sequence[Sample], predictions: Mapping[str, str] | Sequence[str], parser: str
) -> tuple[list[bool], int]:
    """Per-sample correctness under ``parser`` and the number of unparsable answers."""
    if parser not in CHOICE_PARSERS:
        raise ValueError(f"unknown choice parser {parser!r}; expected one of {tuple(CHOICE_PARSERS)}")
    parse = CHOICE_PARSERS[parser]
    picked = [parse(p, s.choices) for s, p in zip(samples, align_predictions(samples, predictions))]
    return [pick == s.answer for s, pick in zip(samples, picked)], sum(p is None for p in picked)


def accuracy_by(samples: Sequence[Sample], hits: Sequence[bool], key: str) -> dict[str, float]:
    """Accuracy per value of ``metadata[key]`` (samples without it are left out).

    Example:
        >>> s = [Sample("x", str(i), "q", "q", ["A"], metadata={"t": t}) for i, t in enumerate("aab")]
        >>> accuracy_by(s, [True, False, True], "t")
        {'a': 0.5, 'b': 1.0}
    """
    groups: dict[str, list[bool]] = {}
    for s, hit in zip(samples, hits):
        if s.metadata.get(key) is not None:
            groups.setdefault(str(s.metadata[key]), []).append(hit)
    return {k: sum(v) / len(v) for k, v in groups.items()}


def score_scienceqa(
    samples: Sequence[Sample], predictions: Mapping[str, str] | Sequence[str], parser: str = "scienceqa"
) -> dict:
    """ScienceQA-IMG accuracy in [0, 1], overall and per subject.

    Example:
        >>> s = Sample("scienceqa", "1", "q", "q", ["B"], choices=["x", "y"])
        >>> score_scienceqa([s], ["B. y"])["accuracy"]
        1.0
    """
    hits, unparsed = choice_hits(samples, predictions, parser)
    return {
        "parser": parser,
        "n": len(hits),
        "accuracy": sum(hits) / len(hits),
        "unparsed": unparsed,
        "by_subject": accuracy_by(samples, hits, "subject"),
    }


def score_seedbench(
    samples: Sequence[Sample], predictions: Mapping[str, str] | Sequence[str], parser: str = "extract"
) -> dict:
    """SEED-Bench (image) accuracy in [0, 1], overall and per question type.

    ``parser="first_letter"`` reproduces lmms-eval's first-character rule.

    Example:
        >>> s = Sample("seedbench", "1", "q", "q", ["C"], choices=["w", "x", "y", "z"])
        >>> score_seedbench([s], ["The answer is C."])["accuracy"]
        1.0
    """
    hits, unparsed = choice_hits(samples, predictions, parser)
    key = "question_type" if any(s.metadata.get("question_type") for s in samples) else "question_type_id"
    return {
        "parser": parser,
        "n": len(hits),
        "accuracy": sum(hits) / len(hits),
        "unparsed": unparsed,
        "by_question_type": accuracy_by(samples, hits, key),
    }


def score_mmbench(
    samples: Sequence[Sample], predictions: Mapping[str, str] | Sequence[str], parser: str = "extract"
) -> dict:
    """MMBench circular evaluation: a question counts only if it and all its rotated copies are right.

    ``vanilla_accuracy`` scores the original rows alone; ``by_category`` is circular accuracy.

    Example:
        >>> original = Sample("mmbench", "0", "q", "q", ["A"], choices=["x", "y"], group="0")
        >>> rotated = Sample("mmbench", "1000000", "q", "q", ["B"], choices=["y", "x"], group="0",
        ...                  metadata={"circular_copy": True})
        >>> r = score_mmbench([original, rotated], ["A", "A"])  # the rotated copy is wrong
        >>> r["circular_accuracy"], r["vanilla_accuracy"]
        (0.0, 1.0)
    """
    hits, unparsed = choice_hits(samples, predictions, parser)
    questions: dict[str, list[bool]] = {}
    category: dict[str, str] = {}
    for s, hit in zip(samples, hits):
        questions.setdefault(s.group_key, []).append(hit)
        category.setdefault(s.group_key, str(s.metadata.get("category", "")))
    solved = {q: all(oks) for q, oks in questions.items()}
    by_category: dict[str, list[bool]] = {}
    for q, ok in solved.items():
        by_category.setdefault(category[q], []).append(ok)
    originals = [hit for s, hit in zip(samples, hits) if not s.metadata.get("circular_copy")]
    return {
        "parser": parser,
        "n": len(hits),
        "n_questions": len(solved),
        "circular_accuracy": sum(solved.values()) / len(solved),
        "vanilla_accuracy": sum(originals) / len(originals) if originals else 0.0,
        "unparsed": unparsed,
        "by_category": {c: sum(v) / len(v) for c, v in by_category.items()},
    }
