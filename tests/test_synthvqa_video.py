"""SynthVQA-Video: the generator, the trainer's video path and the video fidelity helpers."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from vtprune.eval.synthetic.synthvqa_video import (
    DIRECTIONS,
    STEPS,
    VIDEO_ANSWER_SPACE,
    VIDEO_QTYPES,
    VIDEO_WORDS,
    build_video_prompt,
    generate_synthvqa_video,
)


def _same(a: dict, b: dict) -> bool:
    return (
        a["question"] == b["question"]
        and a["answer"] == b["answer"]
        and a["states"] == b["states"]
        and all(x.tobytes() == y.tobytes() for x, y in zip(a["frames"], b["frames"]))
    )


def test_generator_is_deterministic_by_split_seed_and_index():
    items = generate_synthvqa_video(6, seed=3)
    assert all(_same(a, b) for a, b in zip(items, generate_synthvqa_video(6, seed=3)))
    # item i does not depend on how many items are asked for, nor on where the range starts
    assert _same(generate_synthvqa_video(2, seed=3, start=4)[1], items[5])
    other = generate_synthvqa_video(6, seed=4) + generate_synthvqa_video(6, seed=3, split="train")
    assert not any(_same(a, b) for a in items for b in other)


def test_answers_are_balanced_per_question_type():
    items = generate_synthvqa_video(72, seed=0)
    counts = Counter((it["qtype"], it["answer"]) for it in items)
    for qtype in VIDEO_QTYPES:
        per = [counts[(qtype, a)] for a in VIDEO_ANSWER_SPACE[qtype]]
        assert len(set(per)) == 1 and per[0] > 0, (qtype, per)


def test_answers_follow_from_the_clip():
    """Each answer is what the clip shows; frames come in identical pairs (one still per tubelet)."""
    for it in generate_synthvqa_video(48, seed=1, questions_per_clip=4):
        assert len(it["frames"]) == 2 * STEPS and it["frames"][0].size == (192, 192)
        assert all(it["frames"][2 * s].tobytes() == it["frames"][2 * s + 1].tobytes() for s in range(STEPS))
        for q in [it] + it["extra"]:
            where = {}  # name -> {state: (row, col)}
            for s, state in enumerate(it["states"]):
                for o in state:
                    where.setdefault(f"{o['colour']} {o['shape']}", {})[s] = (o["row"], o["col"])
            if q["qtype"] == "count":
                assert q["answer"] == str(len(where))
                if q is it and len(where) > 1:  # count clips: no single state shows them all
                    assert max(len(state) for state in it["states"]) < len(where)
            elif q["qtype"] == "motion":
                name = q["question"].split(" the ")[1].removesuffix(" move ?")
                (r0, c0), (r1, c1) = where[name][0], where[name][STEPS - 1]
                dr, dc = DIRECTIONS[q["answer"]]
                assert (r1 - r0) * dr + (c1 - c0) * dc > 0 and (r1 - r0) * dc == (c1 - c0) * dr == 0
            else:
                name = q["question"].split(" the ")[1].removesuffix(" in")
                state = 0 if " first " in q["question"] else STEPS - 1
                assert (state in where[name]) == (q["answer"] == "yes"), q
                assert where[name]  # the object is always somewhere in the clip


def _video_model():
    from vtprune.eval.synthetic.tiny_models import build_tiny

    model, processor = build_tiny("qwen2_vl", seed=0, extra_words=VIDEO_WORDS)
    return model.eval(), processor


def test_video_batch_shapes_and_packed_blocks_equal_single_prompts():
    from vtprune.eval.synthetic.synthvqa import build_target
    from vtprune.eval.synthetic.train_aux import answer_focus, media_token_labels
    from vtprune.eval.synthetic.train_tiny import make_batch

    model, processor = _video_model()
    items = generate_synthvqa_video(2, seed=5, split="train", questions_per_clip=3)
    batch = make_batch(items, processor, "qwen2_vl", model)
    assert batch["video_grid_thw"].tolist() == [[STEPS, 16, 16]] * 2
    assert tuple(batch["pixel_values_videos"].shape) == (2 * STEPS * 256, 3 * 2 * 12 * 12)
    assert "pixel_values" not in batch
    assert ((batch["input_ids"] == model.config.video_token_id).sum(1) == STEPS * 64).all()
    assert media_token_labels(items, 8).shape == (2, STEPS * 64, 4)
    rows, positions, focus = answer_focus(items, batch, 8, model.config.video_token_id, heads=4)
    assert focus.shape[:2] == (sum(1 + len(it["extra"]) for it in items), 4)

    inputs = {k: v for k, v in batch.items() if k not in ("labels", "label_qtype")}
    with torch.no_grad():
        packed = model(**inputs).logits[0]
    item = items[0]
    answer_pos = (batch["labels"][0] != -100).nonzero().flatten().tolist()[::2]
    questions = [(item["question"], item["answer"])] + [(e["question"], e["answer"]) for e in item["extra"]]
    assert len(answer_pos) == len(questions) == 3
    for pos, (question, answer) in zip(answer_pos, questions):
        text = build_video_prompt(question) + build_target(answer, "qwen2_vl")
        single_in = processor(videos=[item["frames"]], text=[text], return_tensors="pt")
        with torch.no_grad():
            single = model(**single_in).logits[0]
        torch.testing.assert_close(packed[pos - 1], single[-3], atol=1e-4, rtol=1e-4)


def test_video_training_from_the_image_model_runs_and_resumes_exactly(tmp_path, monkeypatch):
    """``--media video --init <image asset> --image-every 2``: an interrupted run ends with the same
    weights as an uninterrupted one; the answer loss is finite and the vocabulary grew."""
    from safetensors.torch import load_file

    import vtprune.eval.synthetic.train_tiny as tt
    from vtprune.eval.synthetic.tiny_models import asset_dir

    opts = dict(
        steps=4, batch_size=2, questions_per_image=2, ckpt_every=2, eval_n=3, image_eval_n=0, threads=1
    )
    opts.update(media="video", init=asset_dir("qwen2_vl"), image_every=2, freeze_vision=True)
    info = tt.train("qwen2_vl", str(tmp_path / "whole"), **opts)
    assert info["eval"]["n"] == 3 and info["media"] == "video"

    real = tt.generate_synthvqa_video

    def interrupt_at_step_2(n, **kw):  # step 2 is a video step (step 1 and 3 are image steps)
        if kw.get("split") == "train" and kw.get("start") == 2 * opts["batch_size"]:
            raise KeyboardInterrupt
        return real(n, **kw)

    monkeypatch.setattr(tt, "generate_synthvqa_video", interrupt_at_step_2)
    with pytest.raises(KeyboardInterrupt):
        tt.train("qwen2_vl", str(tmp_path / "resumed"), **opts)
    monkeypatch.setattr(tt, "generate_synthvqa_video", real)
    tt.train("qwen2_vl", str(tmp_path / "resumed"), **opts)

    whole = load_file(tmp_path / "whole" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "model.safetensors")
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    image = load_file(f"{asset_dir('qwen2_vl')}/model.safetensors")
    key = next(k for k in whole if k.endswith("embed_tokens.weight"))
    assert whole[key].shape[0] > image[key].shape[0]  # video words appended
    tower = [k for k in whole if k.startswith("visual.")]
    assert tower and all(torch.equal(whole[k], image[k]) for k in tower)  # frozen tower
    assert not torch.equal(whole["model.norm.weight"], image["model.norm.weight"])  # the decoder trained


def test_media_option_errors_name_the_value():
    import vtprune.eval.synthetic.train_tiny as tt

    with pytest.raises(ValueError, match="media must be one of .*'audio'"):
        tt.train("qwen2_vl", "/nonexistent", media="audio")
    with pytest.raises(ValueError, match="needs arch 'qwen2_vl'.*'llava'"):
        tt.train("llava", "/nonexistent", media="video")


def test_video_plans_cover_both_budgets_and_the_clip_methods():
    from vtprune.eval.harness.fidelity_video import video_plans
    from vtprune.eval.harness.plans import plan_config

    plans = video_plans(["random"], ["fastv", "temporal"], [0.5, 0.11])
    assert plans[0] == "baseline" and len(plans) == 1 + 2 * 4
    assert [plan_config(p).video_budget for p in plans if p.startswith("random")] == ["frame", "clip"] * 2


# ---------------------------------------------------------------------------------------------------------
# the shipped video checkpoint
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def video_asset():
    import os

    from vtprune.eval.synthetic.tiny_models import asset_dir, load_tiny

    path = asset_dir("qwen2_vl_video")
    assert os.path.exists(os.path.join(path, "model.safetensors")), f"missing checkpoint in {path}"
    model, processor = load_tiny("qwen2_vl_video")
    return path, model, processor


def test_video_asset_is_small_complete_and_beats_chance(video_asset):
    import os

    from vtprune.eval.synthetic.synthvqa import score_synthvqa
    from vtprune.eval.synthetic.train_tiny import predict

    path, model, processor = video_asset
    assert sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)) < 20 * 2**20
    for name in ("config.json", "processor_config.json", "tokenizer.json", "README.md", "training_info.json"):
        assert os.path.exists(os.path.join(path, name)), name
    assert not os.path.exists(os.path.join(path, "checkpoint")), "training state must not ship"
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "how many ?"}]}]
    templated = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert templated == build_video_prompt("how many ?")
    items = generate_synthvqa_video(24, seed=1, split="test")
    result = score_synthvqa(items, predict(model, processor, items, "qwen2_vl", batch_size=24))
    # chance: 1/4 (motion), 1/2 (frame), 1/4 (count) -> 1/3 overall; trained: 0.85 on 360 clips
    assert result["accuracy"] >= 0.6, result
    assert result["per_qtype"]["motion"] > 0.25, result  # direction is read from the clip, not guessed


def test_temporal_keeps_within_2_percent_on_the_video_asset(video_asset):
    import vtprune
    from vtprune.demo import _encode

    _, model, processor = video_asset
    enc = _encode(processor, generate_synthvqa_video(2, seed=2), "qwen2_vl")
    for keep in (0.5, 0.25, 0.11):
        with torch.no_grad(), vtprune.pruned(model, "temporal", keep=keep):
            model(**enc)
            st = vtprune.stats(model)
        assert st.visual_tokens_in == STEPS * 64
        assert abs(st.keep_ratio - keep) <= 0.02, (keep, st.keep_ratio)


def test_demo_on_the_video_asset_asks_about_clips(capsys):
    from vtprune.cli import main

    main(["demo", "--model", "qwen2_vl_video", "--n", "2", "--methods", "temporal", "--repeats", "1"])
    out = capsys.readouterr().out
    assert "question 1: 'which way does the" in out  # a clip question, not an image one
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith(("baseline ", "temporal "))}
    assert rows["baseline"].endswith(f"{STEPS * 64}x12") and rows["temporal"].endswith(f"{STEPS * 32}x12")


def test_fidelity_video_end_to_end_keep_everything_equals_unpruned(tmp_path):
    """run_video on the shipped video model: keep=1 plans answer every clip as the unpruned model does;
    results, records and the table are written, and a rerun skips finished plans."""
    import gzip
    import json

    from vtprune.eval.harness.fidelity_video import run_video

    opts = dict(limit=12, keeps=(1.0,), frame_methods=("divprune",), clip_methods=("temporal",))
    text = run_video(str(tmp_path), **opts)
    results = json.loads((tmp_path / "results.json").read_text())
    records = [json.loads(line) for line in gzip.open(tmp_path / "records.jsonl.gz", "rt")]
    by_plan = {}
    for r in records:
        by_plan.setdefault(r["plan"], []).append(r["prediction"])
    assert len(by_plan) == 4 and all(len(v) == 12 for v in by_plan.values())
    for plan, answers in by_plan.items():
        assert answers == by_plan["baseline"], plan
        assert results[plan]["keep_ratio"] == 1.0
    assert "| divprune | 100.0% (100.0%) | 100.0% (100.0%) |" in text
    readme = tmp_path / "README.md"
    readme.write_text(readme.read_text() + "\n## What it shows (written by hand)\nA note.\n")
    run_video(str(tmp_path), **opts)  # nothing left to do: no new records, the hand-written notes kept
    assert sum(1 for _ in gzip.open(tmp_path / "records.jsonl.gz", "rt")) == len(records)
    assert readme.read_text().endswith("\n\n## What it shows (written by hand)\nA note.\n")
