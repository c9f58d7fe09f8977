"""The prefill benchmark's Qwen2.5-VL-shaped model: processor-like image and clip inputs, and
FLOPs that count its grouped-query decoder the way the LLaVA path counts LLaVA's."""

from __future__ import annotations

import json

import pytest

from vtprune.eval.speed.bench_prefill import build_qwen_inputs, main, qwen2_5_vl_config
from vtprune.flops import decoder_linear_flops


def test_inputs_mark_images_and_clips_as_the_processor_does():
    image = build_qwen_inputs(1, "image")
    assert (image["mm_token_type_ids"] == 1).sum() == 256
    assert image["image_grid_thw"].tolist() == [[1, 32, 32]]
    assert image["pixel_values"].shape == (32 * 32, 3 * 2 * 14 * 14)
    clip = build_qwen_inputs(2, "video", frames=16)
    assert (clip["mm_token_type_ids"] == 2).sum(1).tolist() == [512, 512]  # 8 tubelets x 64 tokens
    assert clip["video_grid_thw"].tolist() == [[8, 16, 16]] * 2
    assert clip["input_ids"].shape[1] == 512 + 64
    with pytest.raises(ValueError, match="--frames must be a positive multiple of 2"):
        build_qwen_inputs(1, "video", frames=15)


def test_decoder_has_grouped_query_heads_at_any_width():
    t = qwen2_5_vl_config(2048, 2).text_config
    assert (t.num_attention_heads, t.num_key_value_heads, t.head_dim) == (16, 2, 128)


@pytest.mark.parametrize(("media", "frames", "visual"), [("image", "16", 256), ("video", "4", 128)])
def test_quick_run_counts_the_gqa_decoder(tmp_path, capsys, media, frames, visual):
    plans = ["baseline", "temporal:keep=0.25", "random:keep=0.25"]
    argv = ["--quick", "--arch", "qwen2_5_vl", "--layers", "4", "--media", media, "--frames", frames]
    main(argv + ["--plans", ";".join(plans), "--out", str(tmp_path)])
    report = json.loads((tmp_path / "prefill_bench.json").read_text())
    runs = report["results"]["1"]
    assert runs["baseline"]["visual_tokens_per_layer"] == [visual] * 4
    text = qwen2_5_vl_config(64, 4).text_config
    # what the counter measures beyond the decoder's projections (tower, merger, one row of
    # lm_head) is the same for every plan: the decoder's matmuls, k/v at KV-head width, are counted
    rest = set()
    for plan in plans:
        per_layer = runs[plan]["visual_tokens_per_layer"]
        rest.add(runs[plan]["counted_flops"] - decoder_linear_flops(text, [v + 64 for v in per_layer]))
        if plan != "baseline":
            assert per_layer == [visual / 4] * 4
            assert runs[plan]["flops_speedup"] > 1.1
    assert len(rest) == 1 and rest.pop() > 0
    assert report["tower_s"] > 0
    out = capsys.readouterr().out
    assert "Qwen2.5-VL-7B decoder shape" in out and "vision tower runs in every prefill" in out


def test_llava_refuses_video(capsys):
    with pytest.raises(SystemExit):
        main(["--quick", "--media", "video"])
    assert "need --arch qwen2_5_vl" in capsys.readouterr().err
