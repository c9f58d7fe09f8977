"""Benchmark readers on tiny fixture folders written in tmp_path (a few items each, 4x4 PNGs)."""

from __future__ import annotations

import base64
import io
import json
import sys

import pytest
from PIL import Image

from vtprune.eval.benchmarks.readers import (
    READERS,
    BenchmarkFileError,
    HubUnavailableError,
    benchmark_names,
    load_benchmark,
    load_from_hub,
)
from vtprune.eval.benchmarks.samples import MULTIPLE_CHOICE_SUFFIX, SHORT_ANSWER_SUFFIX


def _png_bytes(color=(255, 0, 0)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), color).save(buf, format="PNG")
    return buf.getvalue()


def _image(path, color=(255, 0, 0)):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_png_bytes(color))


def _jsonl(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")


# --- fixture writers: one per benchmark, laid out as in shared/design/EVAL.md ---


def make_pope(root):
    for split in ("random", "popular", "adversarial"):
        records = [
            {
                "question_id": 1,
                "image": "COCO_val2014_1.jpg",
                "text": "Is there a dog in the image?",
                "label": "yes",
            },
            {
                "question_id": 2,
                "image": "COCO_val2014_2.jpg",
                "text": "Is there a cat in the image?",
                "label": "no",
            },
        ]
        _jsonl(root / f"coco_pope_{split}.json", records)
    _image(root / "val2014" / "COCO_val2014_1.jpg")
    _image(root / "val2014" / "COCO_val2014_2.jpg")
    return root


def make_mme(root):
    base = root / "MME_Benchmark_release_version"
    # "images/ + questions_answers_YN/" layout
    _image(base / "artwork" / "images" / "10002.jpg")
    qa = base / "artwork" / "questions_answers_YN"
    qa.mkdir(parents=True)
    (qa / "10002.txt").write_text("Is this by Monet? Please answer yes or no.\tYes\nIs this by Dali?\tNo\n")
    # "image beside txt" layout, with a .png
    _image(base / "OCR" / "0001.png")
    (base / "OCR" / "0001.txt").write_text("Does it say STOP?\tYes\nDoes it say GO?\tNo\n")
    _image(base / "code_reasoning" / "0020.png")
    (base / "code_reasoning" / "0020.txt").write_text("Does it print 3?\tNo\nDoes it print 4?\tYes\n")
    return root


def make_gqa(root):
    questions = {
        "201307251": {"imageId": "n161313", "question": "Is it overcast?", "answer": "no"},
        "201640614": {"imageId": "n235859", "question": "Who is wearing a dress?", "answer": "woman"},
    }
    (root / "testdev_balanced_questions.json").write_text(json.dumps(questions, indent=1))
    _image(root / "images" / "n161313.jpg")
    _image(root / "images" / "n235859.jpg")
    return root


def make_textvqa(root):
    data = [
        {
            "question_id": 34602,
            "image_id": "003a8ae2ef43b901",
            "question": "what is the brand?",
            "answers": ["nous"] * 10,
        },
        {
            "question_id": 34603,
            "image_id": "003a8ae2ef43b902",
            "question": "what number?",
            "answers": ["2"] * 8 + ["two"] * 2,
        },
    ]
    data[0]["ocr_tokens"] = ["nous", "les"]
    (root / "TextVQA_0.5.1_val.json").write_text(
        json.dumps({"dataset_name": "textvqa", "data": data}, indent=1)
    )
    _image(root / "train_images" / "003a8ae2ef43b901.jpg")
    _image(root / "train_images" / "003a8ae2ef43b902.jpg")
    return root


def make_scienceqa(root):
    problems = {
        "5": {"question": "Which is a mammal?", "choices": ["frog", "whale"], "answer": 1, "hint": "Look closely.",
              "image": "image.png", "split": "test", "subject": "natural science"},
        "6": {"question": "Which word is a noun?", "choices": ["run", "cat", "blue"], "answer": 1, "hint": "",
              "image": None, "split": "test", "subject": "language science"},
        "7": {"question": "Which is warmer?", "choices": ["ice", "fire"], "answer": 1, "hint": "",
              "image": "image.png", "split": "train", "subject": "natural science"},
        "8": {"question": "Which is a map of Asia?", "choices": ["A map", "B map", "C map"], "answer": 0, "hint": "",
              "image": "image.png", "split": "test", "subject": "social science"},
    }  # fmt: skip
    (root / "problems.json").write_text(json.dumps(problems))
    (root / "pid_splits.json").write_text(json.dumps({"train": ["7"], "test": ["5", "6", "8"]}))
    _image(root / "test" / "5" / "image.png")
    _image(root / "test" / "8" / "image.png")
    _image(root / "train" / "7" / "image.png")
    return root


MMBENCH_HEADER = [
    "index",
    "question",
    "hint",
    "A",
    "B",
    "C",
    "D",
    "answer",
    "category",
    "l2-category",
    "split",
    "image",
]


def make_mmbench(root, extra_rows=()):
    b64 = base64.b64encode(_png_bytes((0, 0, 255))).decode()
    rows = [
        ["0", "What color is it?", "nan", "red", "blue", "", "", "B", "color", "perception", "dev", b64],
        ["1", "How many?", "Count the dots.", "1", "2", "3", "4", "C", "count", "perception", "dev", b64],
        [
            "1000000",
            "What color is it?",
            "nan",
            "blue",
            "red",
            "",
            "",
            "A",
            "color",
            "perception",
            "dev",
            "0",
        ],
        [
            "1000001",
            "How many?",
            "Count the dots.",
            "2",
            "3",
            "4",
            "1",
            "B",
            "count",
            "perception",
            "dev",
            b64,
        ],
        *extra_rows,
    ]
    lines = ["\t".join(MMBENCH_HEADER)] + ["\t".join(r) for r in rows]
    (root / "mmbench_dev_20230712.tsv").write_text("\n".join(lines) + "\n")
    return root


def make_seedbench(root):
    questions = [
        {"question_id": "101", "question": "What is shown?", "choice_a": "a cat", "choice_b": "a dog",
         "choice_c": "a bird", "choice_d": "a fish", "answer": "B", "data_id": "1454426_2591111986.jpg",
         "data_type": "image", "question_type_id": 1},
        {"question_id": "102", "question": "What happens next?", "choice_a": "x", "choice_b": "y",
         "choice_c": "z", "choice_d": "w", "answer": "A", "data_id": "v1.mp4", "data_type": "video",
         "question_type_id": 10},
        {"question_id": "103", "question": "How many people?", "choice_a": "1", "choice_b": "2",
         "choice_c": "3", "choice_d": "4", "answer": "D", "data_id": "img2", "data_type": "image",
         "question_type_id": 2},
    ]  # fmt: skip
    types = {"Scene Understanding": 1, "Instance Identity": 2, "Action Prediction": 10}
    (root / "SEED-Bench.json").write_text(json.dumps({"questions": questions, "question_type": types}))
    _image(root / "SEED-Bench-image" / "1454426_2591111986.jpg")
    _image(root / "SEED-Bench-image" / "img2.png")
    return root


MAKERS = {
    "pope": (make_pope, 6, SHORT_ANSWER_SUFFIX),
    "mme": (make_mme, 6, SHORT_ANSWER_SUFFIX),
    "gqa": (make_gqa, 2, SHORT_ANSWER_SUFFIX),
    "textvqa": (make_textvqa, 2, SHORT_ANSWER_SUFFIX),
    "scienceqa": (make_scienceqa, 2, MULTIPLE_CHOICE_SUFFIX),
    "mmbench": (make_mmbench, 4, MULTIPLE_CHOICE_SUFFIX),
    "seedbench": (make_seedbench, 2, MULTIPLE_CHOICE_SUFFIX),
}


def _mme_options(name):
    # The fixture holds 3 of MME's 14 subtasks; the full set is tested for the missing-folder error.
    return {"subtasks": ("artwork", "OCR", "code_reasoning")} if name == "mme" else {}


def test_registry_covers_every_benchmark():
    assert set(READERS) == set(MAKERS) == set(benchmark_names())


# --- invariants shared by every reader (one table, one test, as PEFT does for methods) ---


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_reader_invariants(name, tmp_path):
    make, count, suffix = MAKERS[name]
    samples = load_benchmark(name, make(tmp_path), **_mme_options(name))
    assert len(samples) == count
    assert len({s.sample_id for s in samples}) == count
    for s in samples:
        assert s.benchmark == name
        assert s.prompt.startswith(s.question) or s.question in s.prompt
        assert s.prompt.endswith(suffix)
        assert s.answers and all(isinstance(a, str) for a in s.answers)
        if s.choices:
            assert s.answer in "ABCDEFGHI"[: len(s.choices)]
        assert s.load_image().size == (4, 4)
        json.dumps(s.to_record())  # per-sample result files must serialise


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_limit_and_unknown_names(name, tmp_path):
    make, _, _ = MAKERS[name]
    samples = load_benchmark(name, make(tmp_path), limit=1, **_mme_options(name))
    assert len({s.group_key for s in samples}) == 1
    with pytest.raises(TypeError):
        load_benchmark(name, tmp_path, no_such_option=1)


def test_unknown_benchmark_and_missing_folder(tmp_path):
    with pytest.raises(ValueError, match="unknown benchmark 'vqav9'"):
        load_benchmark("vqav9", tmp_path)
    with pytest.raises(BenchmarkFileError, match="not found"):
        load_benchmark("pope", tmp_path / "absent")


# --- per-benchmark details ---


def test_pope_ids_splits_and_labels(tmp_path):
    samples = load_benchmark("pope", make_pope(tmp_path), splits=("random", "adversarial"))
    assert [s.sample_id for s in samples] == ["random/1", "random/2", "adversarial/1", "adversarial/2"]
    assert (
        samples[0].prompt
        == "Is there a dog in the image?\nAnswer the question using a single word or phrase."
    )
    assert [s.answer for s in samples[:2]] == ["yes", "no"]
    assert samples[2].metadata["split"] == "adversarial"
    with pytest.raises(ValueError, match="unknown POPE split"):
        load_benchmark("pope", tmp_path, splits=("easy",))


@pytest.mark.parametrize(
    "line2, message",
    [
        ('{"question_id": 2, "image": "COCO_val2014_2.jpg", "text": "q"', "invalid JSON line"),
        ('{"question_id": 2, "image": "COCO_val2014_2.jpg", "text": "q"}', "missing field 'label'"),
        ('{"question_id": 2, "image": "COCO_val2014_2.jpg", "text": "q", "label": "maybe"}', "yes or no"),
        (
            '{"question_id": 2, "image": "COCO_val2014_9.jpg", "text": "q", "label": "no"}',
            "COCO_val2014_9.jpg",
        ),
    ],
)
def test_pope_malformed_line_names_file_and_line(tmp_path, line2, message):
    make_pope(tmp_path)
    path = tmp_path / "coco_pope_random.json"
    first = path.read_text().splitlines()[0]
    path.write_text(f"{first}\n{line2}\n")
    with pytest.raises(BenchmarkFileError, match=message) as err:
        load_benchmark("pope", tmp_path, splits=("random",))
    assert err.value.line == 2 and err.value.path == str(path)
    assert "coco_pope_random.json:2:" in str(err.value)


def test_pope_missing_split_file(tmp_path):
    make_pope(tmp_path)
    (tmp_path / "coco_pope_popular.json").unlink()
    with pytest.raises(BenchmarkFileError, match="coco_pope_popular.json: file not found"):
        load_benchmark("pope", tmp_path)


def test_mme_both_layouts_and_grouping(tmp_path):
    samples = load_benchmark("mme", make_mme(tmp_path), subtasks=("artwork", "OCR", "code_reasoning"))
    art, ocr, code = samples[0:2], samples[2:4], samples[4:6]
    assert art[0].image.parent.name == "images" and ocr[0].image.name == "0001.png"
    assert [s.sample_id for s in art] == ["artwork/10002/0", "artwork/10002/1"]
    assert {s.group for s in art} == {"artwork/10002"}
    assert [s.answer for s in code] == ["no", "yes"]
    assert ocr[0].metadata["category"] == "perception" and code[0].metadata["category"] == "cognition"
    # Pointing at the release folder itself works too.
    again = load_benchmark("mme", tmp_path / "MME_Benchmark_release_version", subtasks=("OCR",))
    assert [s.sample_id for s in again] == [s.sample_id for s in ocr]


def test_mme_errors(tmp_path):
    make_mme(tmp_path)
    with pytest.raises(BenchmarkFileError, match="subtask folder 'existence' not found"):
        load_benchmark("mme", tmp_path)  # all 14 subtasks by default
    txt = tmp_path / "MME_Benchmark_release_version" / "OCR" / "0001.txt"
    txt.write_text("Does it say STOP?\tYes\nDoes it say GO? No\n")
    with pytest.raises(BenchmarkFileError, match=r"0001.txt:2: expected 'question<TAB>Yes\|No'"):
        load_benchmark("mme", tmp_path, subtasks=("OCR",))
    txt.write_text("Does it say STOP?\tPerhaps\n")
    with pytest.raises(BenchmarkFileError, match="0001.txt:1: answer must be Yes or No"):
        load_benchmark("mme", tmp_path, subtasks=("OCR",))


def test_gqa_missing_key_names_question(tmp_path):
    make_gqa(tmp_path)
    path = tmp_path / "testdev_balanced_questions.json"
    data = json.loads(path.read_text())
    del data["201640614"]["imageId"]
    path.write_text(json.dumps(data))
    with pytest.raises(BenchmarkFileError, match=r"\[key '201640614'\]: missing field 'imageId'"):
        load_benchmark("gqa", tmp_path)


def test_textvqa_ocr_prompt_option(tmp_path):
    make_textvqa(tmp_path)
    plain, with_ocr = load_benchmark("textvqa", tmp_path), load_benchmark("textvqa", tmp_path, ocr=True)
    assert plain[0].prompt == "what is the brand?" + SHORT_ANSWER_SUFFIX
    assert with_ocr[0].prompt == "what is the brand?\nReference OCR token: nous, les" + SHORT_ANSWER_SUFFIX
    assert len(plain[1].answers) == 10


def test_textvqa_bad_json_reports_line(tmp_path):
    (tmp_path / "TextVQA_0.5.1_val.json").write_text('{\n "data": [\n  {"question_id": 1,,}\n ]\n}\n')
    with pytest.raises(BenchmarkFileError, match=r"TextVQA_0.5.1_val.json:3: invalid JSON") as err:
        load_benchmark("textvqa", tmp_path)
    assert err.value.line == 3


def test_scienceqa_image_questions_and_prompt(tmp_path):
    samples = load_benchmark("scienceqa", make_scienceqa(tmp_path))
    assert [s.sample_id for s in samples] == ["5", "8"]  # "6" has no image, "7" is train
    assert samples[0].prompt == (
        "Context: Look closely.\nWhich is a mammal?\nA. frog\nB. whale" + MULTIPLE_CHOICE_SUFFIX
    )
    assert samples[0].answer == "B" and samples[1].answer == "A"
    assert samples[1].prompt.startswith("Which is a map of Asia?\nA. A map")  # empty hint: no Context line
    # Without pid_splits.json the problems' own "split" field decides.
    (tmp_path / "pid_splits.json").unlink()
    assert [s.sample_id for s in load_benchmark("scienceqa", tmp_path)] == ["5", "8"]


def test_scienceqa_bad_answer_index(tmp_path):
    make_scienceqa(tmp_path)
    problems = json.loads((tmp_path / "problems.json").read_text())
    problems["8"]["answer"] = 3
    (tmp_path / "problems.json").write_text(json.dumps(problems))
    with pytest.raises(BenchmarkFileError, match=r"problems.json \[key '8'\]: answer 3"):
        load_benchmark("scienceqa", tmp_path)


def test_mmbench_circular_copies_and_images(tmp_path):
    samples = load_benchmark("mmbench", make_mmbench(tmp_path))
    by_id = {s.sample_id: s for s in samples}
    assert by_id["1000000"].group == by_id["0"].group == "0"
    assert by_id["1000001"].metadata["circular_copy"] and not by_id["1"].metadata["circular_copy"]
    assert by_id["0"].choices == ["red", "blue"]  # empty C/D dropped
    assert by_id["1"].prompt == "Count the dots.\nHow many?\nA. 1\nB. 2\nC. 3\nD. 4" + MULTIPLE_CHOICE_SUFFIX
    assert by_id["0"].prompt.startswith("What color is it?\nA. red")  # "nan" hint left out
    # Row 1000000 stores "0": a reference to row 0's image.
    assert by_id["1000000"].load_image().getpixel((0, 0)) == (0, 0, 255)
    assert [s.sample_id for s in load_benchmark("mmbench", tmp_path, circular=False)] == ["0", "1"]
    # limit counts questions, and keeps each question's circular copies.
    assert [s.sample_id for s in load_benchmark("mmbench", tmp_path, limit=1)] == ["0", "1000000"]


def test_mmbench_malformed_rows(tmp_path):
    make_mmbench(tmp_path, extra_rows=[["2", "Too short", "nan", "a"]])
    with pytest.raises(BenchmarkFileError, match=r"mmbench_dev_20230712.tsv:6: expected 12 tab-separated"):
        load_benchmark("mmbench", tmp_path)
    row = ["2", "Bad image", "nan", "x", "y", "", "", "A", "c", "l2", "dev", "bm90IGFuIGltYWdl"]
    make_mmbench(tmp_path, extra_rows=[row])
    sample = load_benchmark("mmbench", tmp_path)[-1]
    with pytest.raises(BenchmarkFileError, match=r"tsv:6: undecodable image"):
        sample.load_image()
    (tmp_path / "mmbench_dev_20230712.tsv").write_text("index\tquestion\tA\tB\n0\tq\ta\tb\n")
    with pytest.raises(BenchmarkFileError, match=r"tsv:1: header lacks column\(s\) \['answer', 'image'\]"):
        load_benchmark("mmbench", tmp_path)


def test_seedbench_image_questions_only(tmp_path):
    samples = load_benchmark("seedbench", make_seedbench(tmp_path))
    assert [s.sample_id for s in samples] == ["101", "103"]
    assert samples[0].prompt == (
        "What is shown?\nA. a cat\nB. a dog\nC. a bird\nD. a fish" + MULTIPLE_CHOICE_SUFFIX
    )
    assert samples[1].image.name == "img2.png"  # extension found for a bare data_id
    assert samples[1].metadata["question_type"] == "Instance Identity"


def test_seedbench_bad_answer_names_item(tmp_path):
    make_seedbench(tmp_path)
    path = tmp_path / "SEED-Bench.json"
    data = json.loads(path.read_text())
    data["questions"][2]["answer"] = "E"
    path.write_text(json.dumps(data))
    with pytest.raises(BenchmarkFileError, match=r"\[key 'questions\[2\]'\]: answer 'E' is not A-D"):
        load_benchmark("seedbench", tmp_path)


def test_check_images_can_be_skipped(tmp_path):
    make_gqa(tmp_path)
    (tmp_path / "images" / "n161313.jpg").unlink()
    with pytest.raises(BenchmarkFileError, match="n161313.jpg"):
        load_benchmark("gqa", tmp_path)
    samples = load_benchmark("gqa", tmp_path, check_images=False)
    assert samples[0].image == tmp_path / "images" / "n161313.jpg"


# --- hub path: only its error conditions are testable offline ---


def test_load_from_hub_without_datasets_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(ImportError, match="`datasets` package"):
        load_from_hub("pope")


def test_load_from_hub_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", type(sys)("datasets"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubUnavailableError, match="HF_HUB_OFFLINE"):
        load_from_hub("mmbench")
    with pytest.raises(ValueError, match="no hub dataset"):
        load_from_hub("vqav9")
