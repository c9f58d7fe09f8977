"""The eval runner, meters, reports and CLI on a random tiny LLaVA saved to a folder (offline, CPU)."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vtprune.eval.harness.meters import METER_KEYS
from vtprune.eval.harness.records import (
    append_records,
    finished,
    merged_path,
    read_records,
    records_path,
    write_records,
)
from vtprune.eval.harness.runner import run_eval

PLANS = ["uniform:keep=1.0", "random:keep=0.5"]
RUN = dict(limit=8, batch_size=4, max_new_tokens=1)  # synthvqa items 0..7, two batches per plan


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A random 2-layer tiny LLaVA whose head only says "yes" or "no", saved like a checkpoint.

    A random head would answer nonsense and score 0, leaving "accuracy kept" undefined; a
    yes/no head driven by the last hidden state scores on the yes/no questions and still
    depends on the image.
    """
    from vtprune.eval.synthetic.tiny_models import build_tiny, save_tiny

    model, processor = build_tiny("llava", seed=0, text_layers=2, vision_layers=2)
    tok = processor.tokenizer
    yes, no = tok.convert_tokens_to_ids("yes"), tok.convert_tokens_to_ids("no")
    with torch.no_grad():
        w = model.lm_head.weight
        direction = torch.randn(w.shape[1], generator=torch.Generator().manual_seed(1))
        w.zero_()
        w[yes], w[no] = direction, -direction
    path = tmp_path_factory.mktemp("tiny") / "llava"
    save_tiny(model, processor, str(path))
    return path


@pytest.fixture(scope="module")
def run1(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval1")
    results = run_eval(
        str(tiny_dir), ["synthvqa"], None, PLANS, out, **RUN, meter_repeats=1, decode_tokens=3, progress=False
    )
    return out, results


def _records(out: Path, plan: str) -> dict[str, dict]:
    return finished(out, "synthvqa", plan, rank=None)


def test_run_writes_results_and_records(run1):
    out, results = run1
    assert json.loads((out / "results.json").read_text())["tasks"]["synthvqa"]["plans"].keys() == {
        "baseline",
        *PLANS,
    }
    for plan in ["baseline", *PLANS]:
        recs = read_records(merged_path(out, "synthvqa", plan))  # merged, compressed
        assert len(recs) == 8 and not records_path(out, "synthvqa", plan).exists()  # plain file merged away
        assert results["tasks"]["synthvqa"]["plans"][plan]["records"] == str(
            merged_path(".", "synthvqa", plan)
        )
        rec = next(iter(recs.values()))
        assert {"sample_id", "plan", "prompt", "prediction", "answers", "parser"} <= rec.keys()
        assert rec["prompt"].startswith("USER: <image>\n") and rec["parser"] == "synthvqa_exact_match"
        assert rec["prediction"] in ("yes", "no")
    task = results["tasks"]["synthvqa"]
    assert task["parser"] == "synthvqa_exact_match" and task["prompt_example"].endswith(" ASSISTANT:")


def test_keep_all_plan_matches_baseline(run1):
    out, results = run1
    plans = results["tasks"]["synthvqa"]["plans"]
    assert plans["baseline"]["main_score"] > 0
    keep_all = plans["uniform:keep=1.0"]
    assert keep_all["loyalty"] == 1.0 and keep_all["accuracy_kept"] == 1.0
    base, same = _records(out, "baseline"), _records(out, "uniform:keep=1.0")
    assert {k: r["prediction"] for k, r in base.items()} == {k: r["prediction"] for k, r in same.items()}


def test_meters_are_positive_with_documented_keys(run1):
    _, results = run1
    plans = results["tasks"]["synthvqa"]["plans"]
    for plan, p in plans.items():
        m = p["meters"]
        assert set(METER_KEYS) <= m.keys(), plan
        for key in METER_KEYS:
            values = m[key] if isinstance(m[key], list) else [m[key]]
            floor = 0 if key in ("overhead_s", "overhead_share", "peak_memory_delta_bytes") else 1e-12
            assert all(v >= floor for v in values), (plan, key, m[key])
        assert m["timer"] == "perf_counter" and m["peak_memory_kind"].startswith("cpu_")
    base, pruned = plans["baseline"]["meters"], plans["random:keep=0.5"]["meters"]
    assert base["visual_tokens_per_layer"] == [144.0, 144.0] and pruned["equivalent_tokens"] == 72.0
    assert pruned["flops_formula"] < base["flops_formula"] and pruned["flops_counted"] < base["flops_counted"]
    assert pruned["kv_cache_bytes"] < base["kv_cache_bytes"]


def test_interrupted_run_resumes_without_redoing_samples(tiny_dir, tmp_path, monkeypatch):
    from transformers import LlavaForConditionalGeneration

    class Interrupted(Exception):
        pass

    original = LlavaForConditionalGeneration.generate
    calls = {"n": 0, "stop_at": 2}

    def counting(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == calls["stop_at"]:
            raise Interrupted  # dies in the second batch, after the first was written
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LlavaForConditionalGeneration, "generate", counting)
    kw = dict(**RUN, meters=False, progress=False)
    with pytest.raises(Interrupted):
        run_eval(str(tiny_dir), ["synthvqa"], None, PLANS[:1], tmp_path, **kw)
    first = _records(tmp_path, "baseline")
    assert len(first) == 4 and not records_path(tmp_path, "synthvqa", PLANS[0]).exists()
    assert not merged_path(tmp_path, "synthvqa", "baseline").exists()  # merged only when the task ends

    calls.update(n=0, stop_at=-1)
    results = run_eval(str(tiny_dir), ["synthvqa"], None, PLANS[:1], tmp_path, **kw)
    assert calls["n"] == 3  # the 2nd baseline batch + 2 batches of the plan; batch 1 is not redone
    resumed = _records(tmp_path, "baseline")
    assert len(resumed) == 8 and all(resumed[k] == v for k, v in first.items())
    assert results["tasks"]["synthvqa"]["plans"][PLANS[0]]["loyalty"] == 1.0

    calls.update(n=0)
    run_eval(str(tiny_dir), ["synthvqa"], None, PLANS[:1], tmp_path, **kw)
    assert calls["n"] == 0  # everything finished: nothing regenerated
    with pytest.raises(ValueError, match="another run"):  # longer answers must not mix with these
        run_eval(str(tiny_dir), ["synthvqa"], None, PLANS[:1], tmp_path, **{**kw, "max_new_tokens": 2})


def test_smaller_rerun_keeps_every_record_and_reports_on_its_subset(run1, tiny_dir, tmp_path, monkeypatch):
    from transformers import LlavaForConditionalGeneration

    from vtprune.eval.harness.tasks import load_task, score_task

    out = tmp_path / "out"
    shutil.copytree(run1[0], out)
    before = {p: merged_path(out, "synthvqa", p).read_bytes() for p in ["baseline", *PLANS]}
    meters_before = json.loads((out / "synthvqa" / "meters.json").read_text())

    def no_generate(self, *args, **kwargs):
        raise AssertionError("every sample was finished: nothing may be regenerated")

    monkeypatch.setattr(LlavaForConditionalGeneration, "generate", no_generate)
    results = run_eval(
        str(tiny_dir),
        ["synthvqa"],
        None,
        PLANS[:1],
        out,
        **{**RUN, "limit": 4},
        meter_repeats=1,
        progress=False,
    )
    for plan, data in before.items():  # 8 records each, untouched: the plan not asked for too
        assert merged_path(out, "synthvqa", plan).read_bytes() == data, plan
    assert json.loads((out / "synthvqa" / "meters.json").read_text()) == meters_before
    task = results["tasks"]["synthvqa"]
    assert task["n_samples"] == 4 and task["plans"].keys() == {"baseline", PLANS[0]}
    samples = load_task("synthvqa", None, limit=4)
    for plan, p in task["plans"].items():
        recs = _records(out, plan)
        expected = score_task(
            "synthvqa", samples, {s.sample_id: recs[s.sample_id]["prediction"] for s in samples}
        )
        assert p["n"] == 4 and p["main_score"] == expected["main_score"], plan
        assert p["meters"] == meters_before[plan]


def test_merge_keeps_records_outside_the_requested_order(tmp_path):
    from vtprune.eval.harness.records import merge_shards

    append_records(records_path(tmp_path, "t", "baseline"), [{"sample_id": s} for s in "abcd"])
    append_records(records_path(tmp_path, "t", "baseline", 0), [{"sample_id": "e"}])
    append_records(records_path(tmp_path, "t", "baseline", 1), [{"sample_id": "f"}])
    got = merge_shards(tmp_path, "t", "baseline", 2, ["f", "b"])
    assert [r["sample_id"] for r in got] == ["f", "b"]  # what is reported: the requested samples
    assert list(_records_of(tmp_path)) == ["f", "b", "a", "c", "d", "e"]  # what is kept: everything


def _records_of(out: Path) -> dict[str, dict]:
    return read_records(merged_path(out, "t", "baseline"))


def test_resume_reads_the_merged_gzip_and_the_plain_file_together(tmp_path):
    from vtprune.eval.harness.records import merge_shards

    write_records(merged_path(tmp_path, "t", "baseline"), [{"sample_id": s} for s in "ab"])  # committed
    append_records(records_path(tmp_path, "t", "baseline"), [{"sample_id": "c"}])  # resumed run
    assert list(finished(tmp_path, "t", "baseline", rank=None)) == ["a", "b", "c"]
    merge_shards(tmp_path, "t", "baseline", 1, ["c", "b", "a"])
    assert list(_records_of(tmp_path)) == ["c", "b", "a"]
    assert not records_path(tmp_path, "t", "baseline").exists()


def test_gzip_records_are_reproducible_bytes(tmp_path):
    recs = [{"sample_id": str(i), "prediction": "yes"} for i in range(50)]
    write_records(tmp_path / "a.jsonl.gz", recs)
    write_records(tmp_path / "b.jsonl.gz", recs)
    data = (tmp_path / "a.jsonl.gz").read_bytes()
    assert data[:2] == b"\x1f\x8b" and data == (tmp_path / "b.jsonl.gz").read_bytes()


def _gz_records(n: int) -> list[dict]:
    return [{"sample_id": str(i), "prompt": f"quelle température ? → {i} " * 8} for i in range(n)]


def test_gzip_cut_short_reads_its_whole_records_and_skips_the_torn_one(tmp_path):
    path = tmp_path / "baseline.jsonl.gz"
    write_records(path, _gz_records(200))
    data = path.read_bytes()
    plain = gzip.decompress(data)
    seen = set()
    for cut in range(20, len(data) - 8, max(1, len(data) // 40)):  # cut anywhere, trailer included
        path.write_bytes(data[:cut])
        got = read_records(path)
        n = len(got)
        assert list(got) == [str(i) for i in range(n)]  # a prefix of whole records, never an error
        assert n < 200 and all(r == _gz_records(200)[i] for i, r in enumerate(got.values()))
        seen.add(n)
    assert len(seen) > 10  # the cuts landed in many places, some inside records
    assert plain.count(b"\n") == 200


def test_gzip_torn_last_record_is_skipped_like_a_plain_one(tmp_path):
    path = tmp_path / "baseline.jsonl.gz"
    whole = b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in _gz_records(3))
    torn = whole + '{"sample_id": "3", "prompt": "→'.encode()[:-1]  # cut inside a UTF-8 character
    path.write_bytes(gzip.compress(torn, mtime=0))
    assert list(read_records(path)) == ["0", "1", "2"]
    path.write_bytes(gzip.compress(whole[:40], mtime=0) + gzip.compress(whole[40:], mtime=0))  # two members
    assert list(read_records(path)) == ["0", "1", "2"]


def test_corrupt_gzip_or_append_to_gzip_names_the_file(tmp_path):
    path = tmp_path / "baseline.jsonl.gz"
    write_records(path, _gz_records(20))
    data = bytearray(path.read_bytes())
    data[30] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"baseline\.jsonl\.gz"):
        read_records(path)
    with pytest.raises(ValueError, match=r"baseline\.jsonl\.gz: records are appended to a plain \.jsonl"):
        append_records(path, [{"sample_id": "x"}])


def test_torn_last_line_is_redone(tmp_path):
    path = tmp_path / "t.jsonl"
    append_records(path, [{"sample_id": "a", "prediction": "yes"}])
    with open(path, "a") as f:
        f.write('{"sample_id": "b", "predi')  # killed mid-write
    assert list(read_records(path)) == ["a"]
    append_records(path, [{"sample_id": "b", "prediction": "no"}])
    assert read_records(path)["b"]["prediction"] == "no"


def test_record_torn_inside_a_utf8_character_is_redone(tmp_path):
    path = tmp_path / "t.jsonl"
    append_records(path, [{"sample_id": "a", "prompt": "quelle température ? → réponse"}])
    append_records(path, [{"sample_id": "b", "prompt": "quelle température ? → réponse"}])
    data = path.read_bytes()
    cut = data.rindex("→".encode()) + 1  # killed after the first byte of a 3-byte character
    path.write_bytes(data[:cut])
    assert list(read_records(path)) == ["a"]  # the torn record is skipped, not a UnicodeDecodeError
    append_records(path, [{"sample_id": "b", "prediction": "no"}])  # the resumed run redoes it
    assert {k: r.get("prediction") for k, r in read_records(path).items()} == {"a": None, "b": "no"}
    assert path.read_bytes().count(b"\n") == 2  # the torn bytes were cut off, not left mid-file


def test_whole_record_without_its_newline_is_kept(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"sample_id": "a", "prediction": "yes"}')  # killed just before the newline
    append_records(path, [{"sample_id": "b", "prediction": "no"}])
    assert list(read_records(path)) == ["a", "b"]


@pytest.mark.parametrize("garbage", [b"\xff\xfe not utf-8", b'{"sample_id": "b", "pred', b"[1, 2]"])
def test_garbled_line_inside_a_record_file_names_file_and_line(tmp_path, garbage):
    path = tmp_path / "baseline.jsonl"
    path.write_bytes(b'{"sample_id": "a"}\n' + garbage + b'\n{"sample_id": "c"}\n')
    with pytest.raises(ValueError, match=r"baseline\.jsonl, line 2: not a JSON record"):
        read_records(path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_merge_to_the_one_process_records(run1, tiny_dir, tmp_path):
    accelerate = shutil.which("accelerate") or str(Path(sys.executable).with_name("accelerate"))
    if not Path(accelerate).exists():
        pytest.skip("accelerate CLI not installed")
    out1, _ = run1
    out2 = tmp_path / "eval2"
    # `accelerate launch --cpu --num_processes 2` starts ONE process unless an MPI hostfile is
    # given (accelerate 1.x); the torchrun launcher behind --multi_gpu starts two, and the
    # runner joins them in a CPU (gloo) group because no GPU is visible.
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           "-m", "vtprune.eval.harness.cli_eval", "--model", str(tiny_dir), "--tasks", "synthvqa",
           "--plans", ",".join(["baseline", *PLANS]), "--output", str(out2), "--limit", "8",
           "--batch-size", "4", "--max-new-tokens", "1", "--no-meters", "--no-report", "--quiet"]  # fmt: skip
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    keys = ("prompt", "prediction", "answers", "parser")
    for plan in ["baseline", *PLANS]:
        shards = [read_records(records_path(out2, "synthvqa", plan, rank)) for rank in (0, 1)]
        assert [len(s) for s in shards] == [4, 4]  # two ranks, strided shards
        merged, single = _records(out2, plan), _records(out1, plan)
        assert list(merged) == list(single)  # merged back into sample order
        assert {k: [r[x] for x in keys] for k, r in merged.items()} == {
            k: [r[x] for x in keys] for k, r in single.items()
        }


def test_reports_write_markdown_and_png(run1, tmp_path):
    from vtprune.eval.harness.reports import write_report

    _, results = run1
    paths = write_report(results, tmp_path)
    md = paths["markdown"].read_text()
    assert md.count("| synthvqa |") == 3 and "`random:keep=0.5`" in md and "acc. kept" in md
    assert {p.name for p in paths["plots"]} == {
        "synthvqa_accuracy_vs_tokens.png",
        "synthvqa_token_pyramid.png",
        "synthvqa_latency.png",
    }
    for p in paths["plots"]:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_parser_and_task_options():
    import argparse

    from vtprune.eval.harness.cli_eval import _split, add_eval_parser
    from vtprune.eval.harness.tasks import parse_task

    ap = argparse.ArgumentParser(prog="vtprune")
    add_eval_parser(ap.add_subparsers(dest="command"))
    args = ap.parse_args(["eval", "--model", "m", "--tasks", "pope,mme", "--output", "o", "--limit", "3"])
    assert args.limit == 3 and args.batch_size == 8 and args.fn.__name__ == "run_from_args"
    assert _split("baseline,pdrop:layers=8+16+24,ratio=0.5,fastv:keep=0.5") == [
        "baseline",
        "pdrop:layers=8+16+24,ratio=0.5",
        "fastv:keep=0.5",
    ]
    assert _split("pope:parser=lenient,splits=random,mme") == ["pope:parser=lenient,splits=random", "mme"]
    assert parse_task("pope:parser=lenient,splits=random") == (
        "pope",
        {"splits": ("random",)},
        {"parser": "lenient"},
    )
    with pytest.raises(ValueError, match="unknown task"):
        parse_task("nope")


@pytest.mark.parametrize(
    "name",
    [
        "plans",
        "meters",
        "timers",
        "records",
        "tasks",
        "generation",
        "runner",
        "reports",
        "cli_eval",
        "lmms_plugin",
    ],
)
def test_docstring_examples(name):
    import doctest
    import importlib

    import vtprune

    module = importlib.import_module(f"vtprune.eval.harness.{name}")
    result = doctest.testmod(
        module, extraglobs={"torch": torch, "vtprune": vtprune}, optionflags=doctest.ELLIPSIS
    )
    assert result.failed == 0


def _no_model(monkeypatch):
    """Make loading a model (and answering) fail the test: the checks must come first."""

    def fail(*args, **kwargs):
        raise AssertionError("the model was loaded before the plans and task files were checked")

    monkeypatch.setattr("vtprune.eval.harness.runner.load_model", fail)
    monkeypatch.setattr("vtprune.eval.harness.runner.answer_batch", fail)


def _eval_cli(tmp_path, *extra):
    from vtprune.cli import main

    main(["eval", "--model", "llava", "--tasks", "synthvqa", "--output", str(tmp_path / "out"),
          "--limit", "4", "--no-meters", "--no-report", "--quiet", *extra])  # fmt: skip


@pytest.mark.parametrize(
    ("plans", "message"),
    [
        ("baseline,uniform:keep=2", r"plan 'uniform:keep=2': uniform: option 'keep'=2 is invalid"),
        ("baseline,random:sed=1", r"plan 'random:sed=1': random: unknown option\(s\) sed"),
        ("baseline,nosuch:keep=0.5", r"plan 'nosuch:keep=0.5': unknown method 'nosuch'"),
    ],
)
def test_bad_plan_fails_before_anything_is_evaluated(tmp_path, monkeypatch, plans, message):
    _no_model(monkeypatch)
    with pytest.raises(ValueError, match=message):
        _eval_cli(tmp_path, "--plans", plans)
    assert not (tmp_path / "out").exists()


def test_plan_check_runs_the_method_configs_own_validation(tmp_path, monkeypatch):
    # vtprune.apply builds configs with config_from_name, whose __post_init__ runs validate():
    # the up-front check must build them the same way, so every option check a config makes
    # (here a stand-in for seed validation) fails the run before the model is even loaded
    from vtprune.config import REGISTRY

    def seed_must_be_int(self):
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"random: option 'seed'={self.seed!r} is invalid; allowed: an integer")

    monkeypatch.setattr(REGISTRY["random"], "validate", seed_must_be_int)
    _no_model(monkeypatch)
    with pytest.raises(ValueError, match=r"plan 'random:seed=abc': random: option 'seed'='abc' is invalid"):
        _eval_cli(tmp_path, "--plans", "baseline,random:seed=abc")


def test_plan_check_rejects_a_string_seed():
    from vtprune.eval.harness.plans import plan_config

    with pytest.raises(ValueError, match="plan 'random:seed=abc': random: option 'seed'='abc'"):
        plan_config("random:seed=abc")


def test_plan_values_are_parsed_to_their_types():
    from vtprune.eval.harness.plans import parse_plan

    _, opts = parse_plan(
        "layerskip:cut=9,thin_ffn=true,window=1,ffn_ratio=0.25,layers=8+16,seed=abc,score=mean"
    )
    assert opts == {
        "cut": 9,
        "thin_ffn": True,
        "window": 1,
        "ffn_ratio": 0.25,
        "layers": [8, 16],
        "seed": "abc",
        "score": "mean",
    }
    assert type(opts["cut"]) is int and type(opts["window"]) is int  # 9 and 1 are not True


def test_model_dependent_plan_error_fails_before_the_baseline_runs(tiny_dir, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a sample was answered before every plan was checked on the model")

    monkeypatch.setattr("vtprune.eval.harness.runner.answer_batch", fail)
    with pytest.raises(ValueError, match=r"plan 'fastv:layer=99' does not fit this model: .*'layer'=99"):
        run_eval(str(tiny_dir), ["synthvqa"], None, ["fastv:layer=99"], tmp_path, **RUN, progress=False)


def test_missing_data_of_a_later_task_fails_before_anything_is_evaluated(tmp_path, monkeypatch):
    from vtprune.eval.benchmarks.samples import BenchmarkFileError

    _no_model(monkeypatch)
    empty = tmp_path / "data"
    empty.mkdir()
    with pytest.raises(BenchmarkFileError, match="pope"):
        _eval_cli(tmp_path, "--tasks", "synthvqa,pope", "--data-dir", str(empty))
    with pytest.raises(ValueError, match="'mme' needs --data-dir"):
        _eval_cli(tmp_path, "--tasks", "synthvqa,mme")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "model", ["/no/such/folder/llava", "./no-such-checkpoint", "no/such/folder", "~/nope"]
)
def test_missing_model_folder_is_named(tmp_path, model):
    from vtprune.cli import main

    with pytest.raises(FileNotFoundError, match=r"^no such folder or hub id: '.*no.*'"):
        main(["eval", "--model", model, "--tasks", "synthvqa", "--output", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_hub_id_that_cannot_be_found_is_named(monkeypatch):
    import transformers

    from vtprune.eval.harness.generation import load_model

    def not_found(source, *args, **kwargs):
        raise OSError(f"{source} is not a local folder and is not a valid model identifier listed on the hub")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", not_found)
    with pytest.raises(
        FileNotFoundError, match=r"no such folder or hub id: 'org/no-such-model' \(org/no-such"
    ):
        load_model("org/no-such-model")
