"""SynthVQA generator: determinism, answer balance, answers checked against the scene, I/O, scoring."""

from collections import Counter

import pytest

from vtprune.eval.synthetic.synthvqa import (
    ANSWER_SPACE,
    AUX_QTYPES,
    QTYPES,
    build_prompt,
    build_target,
    generate_synthvqa,
    normalize_answer,
    prompt_parts,
    read_synthvqa,
    score_synthvqa,
    write_synthvqa,
)
from vtprune.eval.synthetic.synthvqa_scenes import COLOURS, SHAPES


def _find(objects, colour, shape):
    hits = [o for o in objects if o["colour"] == colour and o["shape"] == shape]
    assert len(hits) <= 1, "colour+shape combinations must be unique in a scene"
    return hits[0] if hits else None


def _expected_answer(question: str, objects: list[dict]) -> str:
    """Answer a question from the scene description alone (independent re-implementation)."""
    w = question.split()
    if w[:2] == ["is", "there"]:  # is there a <colour> <shape> ?
        return "yes" if _find(objects, w[3], w[4]) else "no"
    if w[:2] == ["what", "color"]:  # what color is the <shape> ?
        (o,) = [o for o in objects if o["shape"] == w[4]]
        return o["colour"]
    if w[:2] == ["how", "many"]:  # how many <colour> objects are there ?
        return str(sum(o["colour"] == w[2] for o in objects))
    if w[:2] == ["what", "shape"]:  # (auxiliary) what shape is the <colour> object ?
        (o,) = [o for o in objects if o["colour"] == w[4]]
        return o["shape"]
    if w[0] == "which":  # (auxiliary) which row|column is the <colour> <shape> in ?
        o = _find(objects, w[4], w[5])
        return str((o["row"] if w[1] == "row" else o["col"]) + 1)
    # is the <c1> <s1> left of|above the <c2> <s2> ?
    a = _find(objects, w[2], w[3])
    rel = "left of" if w[4] == "left" else "above"
    c2, s2 = w[-3], w[-2]
    b = _find(objects, c2, s2)
    assert a is not None and b is not None
    key = "col" if rel == "left of" else "row"
    assert a[key] != b[key], "spatial questions never compare objects on the same column/row"
    return "yes" if a[key] < b[key] else "no"


@pytest.fixture(scope="module")
def items():
    return generate_synthvqa(80, seed=0, questions_per_image=4)


def test_deterministic_and_prefix_stable(items):
    again = generate_synthvqa(12, seed=0, questions_per_image=4)
    for a, b in zip(items, again):
        assert (a["id"], a["question"], a["answer"], a["objects"]) == (
            b["id"],
            b["question"],
            b["answer"],
            b["objects"],
        )
        assert a["image"].tobytes() == b["image"].tobytes()
        assert a["extra"] == b["extra"]
    shifted = generate_synthvqa(3, seed=0, start=5)
    assert [s["question"] for s in shifted] == [it["question"] for it in items[5:8]]
    other = generate_synthvqa(12, seed=1)
    assert [o["question"] for o in other] != [it["question"] for it in items[:12]]
    train = generate_synthvqa(12, seed=0, split="train")
    assert [t["question"] for t in train] != [it["question"] for it in items[:12]]


def test_balanced_answers(items):
    assert Counter(it["qtype"] for it in items) == {q: 20 for q in QTYPES}
    for qtype in QTYPES:
        answers = Counter(it["answer"] for it in items if it["qtype"] == qtype)
        space = ANSWER_SPACE[qtype]
        assert set(answers) == set(space)
        assert len(set(answers.values())) == 1, (qtype, answers)  # exactly balanced
    for it in items:
        assert it["choices"] == list(ANSWER_SPACE[it["qtype"]])
        assert it["answer"] in it["choices"]


def test_answers_match_scene(items):
    for it in items:
        objects = it["objects"]
        assert 3 <= len(objects) <= 7
        assert len({(o["row"], o["col"]) for o in objects}) == len(objects)
        for q in [{"question": it["question"], "answer": it["answer"]}, *it["extra"]]:
            assert _expected_answer(q["question"], objects) == q["answer"], q
        assert all(0 <= f < len(objects) for f in it["focus"])


def test_existence_negatives_are_adversarial(items):
    negatives = [it for it in items if it["qtype"] == "exist" and it["answer"] == "no"]
    for it in negatives:
        colour, shape = it["question"].split()[3:5]
        assert any(o["colour"] == colour or o["shape"] == shape for o in it["objects"])


def test_pixels_show_the_objects(items):
    for it in items[:20]:
        for o in it["objects"]:
            x0, y0, x1, y1 = o["bbox"]
            centre = ((x0 + x1) // 2, (y0 + y1) // 2)
            assert it["image"].getpixel(centre) == COLOURS[o["colour"]]
            assert o["shape"] in SHAPES


def test_auxiliary_training_questions():
    items = generate_synthvqa(
        40, seed=0, split="train", questions_per_image=8, extra_qtypes=QTYPES + AUX_QTYPES
    )
    extra = [e for it in items for e in it["extra"]]
    assert {e["qtype"] for e in extra} == set(QTYPES + AUX_QTYPES)
    for it in items:
        for e in it["extra"]:
            assert _expected_answer(e["question"], it["objects"]) == e["answer"], e


def test_curriculum_object_range():
    small = generate_synthvqa(40, seed=0, split="train", n_objects=(1, 2))
    assert all(len(it["objects"]) <= 2 for it in small)
    for it in small:
        assert _expected_answer(it["question"], it["objects"]) == it["answer"]


def test_write_read_round_trip(tmp_path):
    path = write_synthvqa(str(tmp_path), 6, seed=3)
    assert path.endswith("synthvqa.jsonl")
    loaded = read_synthvqa(str(tmp_path))
    original = generate_synthvqa(6, seed=3)
    assert len(loaded) == 6
    for a, b in zip(loaded, original):
        for key in ("id", "question", "answer", "qtype", "choices", "focus"):
            assert a[key] == b[key]
        assert [tuple(o["bbox"]) for o in a["objects"]] == [tuple(o["bbox"]) for o in b["objects"]]
        assert a["image"].mode == "RGB" and a["image"].tobytes() == b["image"].tobytes()


def test_scorer():
    items = [
        {"id": "a", "answer": "yes", "qtype": "exist"},
        {"id": "b", "answer": "no", "qtype": "exist"},
        {"id": "c", "answer": "red", "qtype": "attribute"},
        {"id": "d", "answer": "3", "qtype": "count"},
    ]
    res = score_synthvqa(items, ["Yes.", " yes", "RED", "3"])
    assert res["accuracy"] == 0.75 and res["n"] == 4
    assert res["per_qtype"] == {"exist": 0.5, "attribute": 1.0, "count": 1.0}
    assert res["n_per_qtype"] == {"exist": 2, "attribute": 1, "count": 1}
    res = score_synthvqa(items, {"a": "yes", "d": "three"})  # missing ids count as wrong
    assert res["accuracy"] == 0.25
    with pytest.raises(ValueError):
        score_synthvqa(items, ["yes"])
    assert normalize_answer(" No! ") == "no"


def test_prompt_format():
    for arch, image_token in (("llava", "<image>"), ("qwen2_vl", "<|image_pad|>")):
        prompt = build_prompt("is there a red circle ?", arch)
        prefix, suffix = prompt_parts(arch)
        assert prompt == prefix + "is there a red circle ?" + suffix
        assert prompt.count(image_token) == 1
        assert build_target("yes", arch).strip().startswith("yes")
    assert build_prompt("q ?", "llava") == "USER: <image>\nq ? ASSISTANT:"
    with pytest.raises(ValueError):
        build_prompt("q ?", "blip")
