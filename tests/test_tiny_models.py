"""Shipped tiny SynthVQA checkpoints: offline loading, image-token counts, accuracy; trainer packing."""

import os

import pytest
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration, Qwen2VLForConditionalGeneration

from vtprune.eval.synthetic.synthvqa import build_prompt, build_target, generate_synthvqa, score_synthvqa
from vtprune.eval.synthetic.tiny_models import asset_dir, build_tiny, num_image_tokens
from vtprune.eval.synthetic.train_tiny import make_batch, predict

CLASSES = {"llava": LlavaForConditionalGeneration, "qwen2_vl": Qwen2VLForConditionalGeneration}
VISUAL_TOKENS = {"llava": 144, "qwen2_vl": 64}


@pytest.fixture(scope="module", params=["llava", "qwen2_vl"])
def shipped(request):
    arch = request.param
    path = asset_dir(arch)
    assert os.path.exists(os.path.join(path, "model.safetensors")), f"missing checkpoint in {path}"
    model = CLASSES[arch].from_pretrained(path, local_files_only=True).eval()
    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    return arch, path, model, processor


def test_checkpoint_is_small_and_complete(shipped):
    arch, path, model, _ = shipped
    size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
    assert size < 20 * 2**20
    for name in ("config.json", "processor_config.json", "tokenizer.json", "README.md"):
        assert os.path.exists(os.path.join(path, name)), name
    assert not os.path.exists(os.path.join(path, "checkpoint")), "training state must not ship"
    assert next(model.parameters()).dtype == torch.float32


def test_processor_expands_image_tokens(shipped):
    arch, _, model, processor = shipped
    item = generate_synthvqa(1, seed=7)[0]
    batch = processor(
        images=[item["image"]], text=[build_prompt(item["question"], arch)], return_tensors="pt"
    )
    n_image = int((batch["input_ids"] == model.config.image_token_id).sum())
    assert n_image == VISUAL_TOKENS[arch] == num_image_tokens(processor, arch)
    if arch == "qwen2_vl":
        assert batch["image_grid_thw"].tolist() == [[1, 16, 16]]  # 16x16 patches, merged 2x2 -> 64
        assert "mm_token_type_ids" in batch
    else:
        assert tuple(batch["pixel_values"].shape) == (1, 3, 192, 192)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": item["question"]}]}]
    templated = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert templated == build_prompt(item["question"], arch)


def test_greedy_accuracy_well_above_chance(shipped):
    arch, _, model, processor = shipped
    torch.manual_seed(0)
    items = generate_synthvqa(32, seed=1, split="test")
    answers = predict(model, processor, items, arch, batch_size=16)
    result = score_synthvqa(items, answers)
    # chance is ~0.35 (yes/no 0.5, colour/count 0.2)
    assert result["accuracy"] >= 0.6, result  # trained: 0.80 (LLaVA) and 0.95 (Qwen2-VL) on 400 items


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl"])
def test_packed_training_batch_equals_single_prompts(arch):
    """Each packed question block must see exactly what the single-question prompt sees."""
    model, processor = build_tiny(arch, seed=0)
    model.eval()
    item = generate_synthvqa(1, seed=2, split="train", questions_per_image=3)[0]
    batch = make_batch([item], processor, arch, model)
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "label_qtype")}
    with torch.no_grad():
        packed = model(**inputs).logits[0]
    answer_pos = (batch["labels"][0] != -100).nonzero().flatten().tolist()[::2]  # answer word per block
    questions = [(item["question"], item["answer"])] + [(e["question"], e["answer"]) for e in item["extra"]]
    assert len(answer_pos) == len(questions) == 3
    for pos, (question, answer) in zip(answer_pos, questions):
        text = build_prompt(question, arch) + build_target(answer, arch)
        single_in = processor(images=[item["image"]], text=[text], return_tensors="pt")
        with torch.no_grad():
            single = model(**single_in).logits[0]
        assert single_in["input_ids"][0, -2] == batch["input_ids"][0, pos]
        torch.testing.assert_close(packed[pos - 1], single[-3], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("side", [12, 8])
def test_scene_token_labels_mark_the_whole_cell(side):
    from vtprune.eval.synthetic.train_aux import scene_token_labels

    item = {"objects": [{"colour": "blue", "shape": "cross", "row": 1, "col": 2}]}
    labels = scene_token_labels([item], side).reshape(side, side, 4)
    per_cell = side // 4
    cell = (slice(per_cell, 2 * per_cell), slice(2 * per_cell, 3 * per_cell))
    assert labels[cell].reshape(-1, 4).tolist() == [[3, 4, 1, 2]] * per_cell**2  # blue=3rd, cross=4th, +1
    labels[cell] = torch.tensor([0, 0, -100, -100])
    assert (labels == torch.tensor([0, 0, -100, -100])).all()
    with pytest.raises(ValueError, match="multiple of the scene grid"):
        scene_token_labels([item], 10)


def test_answer_focus_and_attention_probe_on_a_packed_batch():
    from vtprune.eval.synthetic.train_aux import AnswerAttentionProbe, answer_focus

    model, processor = build_tiny("qwen2_vl", seed=0)
    items = generate_synthvqa(2, seed=4, split="train", questions_per_image=3)
    batch = make_batch(items, processor, "qwen2_vl", model)
    rows, positions, focus = answer_focus(items, batch, 8, model.config.image_token_id, heads=4)
    blocks = [(b, q) for b, it in enumerate(items) for q in [it] + it["extra"]]
    assert len(rows) == len(blocks) == 6
    image = batch["input_ids"] == model.config.image_token_id
    for n, (b, q) in enumerate(blocks):
        assert rows[n] == b
        assert batch["labels"][b, positions[n]] == -100 and batch["labels"][b, positions[n] + 1] != -100
        if (q["qtype"] == "exist" and q["answer"] == "no") or not q["focus"]:
            assert focus[n].nonzero()[:, 1].tolist() == [0] * 4  # nothing matches: every head on the sink
        elif q["qtype"] == "spatial":  # heads 0-1 on the first object, 2-3 on the second, 2x2 tokens each
            assert [int(f.sum()) for f in focus[n]] == [4] * 4
            assert torch.equal(focus[n][0], focus[n][1]) and not (focus[n][0] & focus[n][2]).any()
        else:
            assert [int(f.sum()) for f in focus[n]] == [4 * len(q["focus"])] * 4  # 2x2 merged tokens per cell
        assert bool(image[b][focus[n].any(0)].all()) or focus[n][0, 0]

    probe = AnswerAttentionProbe(model, layer=1)
    try:
        probe.query = (rows, positions)
        with torch.no_grad():
            model(**{k: v for k, v in batch.items() if k not in ("labels", "label_qtype")})
        probs = probe.probs
        torch.testing.assert_close(probs.sum(-1), torch.ones_like(probs.sum(-1)))
        allowed = batch["attention_mask"][rows, 0, positions]  # causal, image prefix + own block
        assert float(probs.masked_fill(allowed[:, None], 0).abs().max()) == 0.0
        assert 0 < float(probe.loss(focus)) < 20
    finally:
        probe.remove()
    assert model.config.text_config._attn_implementation != AnswerAttentionProbe.NAME


def test_training_resumes_exactly_after_an_interrupt(tmp_path, monkeypatch):
    """An interrupted ``train`` picks up from its last checkpoint and ends with the same weights."""
    from safetensors.torch import load_file

    import vtprune.eval.synthetic.train_tiny as tt

    opts = dict(steps=4, batch_size=2, questions_per_image=2, ckpt_every=2, eval_n=4, threads=1)
    tt.train("qwen2_vl", str(tmp_path / "whole"), **opts)

    real = tt.generate_synthvqa

    def interrupt_at_step_3(n, **kw):
        if kw.get("split") == "train" and kw.get("start") == 3 * opts["batch_size"]:
            raise KeyboardInterrupt
        return real(n, **kw)

    monkeypatch.setattr(tt, "generate_synthvqa", interrupt_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        tt.train("qwen2_vl", str(tmp_path / "resumed"), **opts)
    assert torch.load(tmp_path / "resumed" / tt.CKPT_NAME, weights_only=True)["step"] == 2
    monkeypatch.setattr(tt, "generate_synthvqa", real)
    tt.train("qwen2_vl", str(tmp_path / "resumed"), **opts)

    whole = load_file(tmp_path / "whole" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "model.safetensors")
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    assert not (tmp_path / "resumed" / "checkpoint").exists()


def _leave_a_mark(path):
    open(path, "w").close()
    return {}


class _Payload:
    """Unpickling this would call ``_leave_a_mark``: what a tampered checkpoint could do."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return _leave_a_mark, (self.path,)


def test_training_refuses_a_checkpoint_that_is_not_plain_weights(tmp_path):
    """Resume unpickles with ``weights_only=True``: a checkpoint holding any other object is refused
    before anything in it runs."""
    import vtprune.eval.synthetic.train_tiny as tt

    mark = tmp_path / "ran"
    ckpt = tmp_path / "run" / tt.CKPT_NAME
    ckpt.parent.mkdir(parents=True)
    torch.save({"arch": "qwen2_vl", "seed": 0, "steps": 4, "model": _Payload(str(mark))}, ckpt)
    with pytest.raises(SystemExit, match="not loaded"):
        tt.train("qwen2_vl", str(tmp_path / "run"), steps=4, batch_size=2, eval_n=4, threads=1)
    assert not mark.exists()
