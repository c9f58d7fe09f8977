"""FLOPs of full-size configs on the meta device (``vtprune.eval.speed.flops_report``)."""

from __future__ import annotations

import doctest

import pytest
from transformers import AutoConfig, LlavaConfig

from vtprune.eval.speed import flops_report as fr
from vtprune.eval.speed.shapes import llava_config
from vtprune.flops import attention_flops, decoder_linear_flops

# name -> (architecture, layers, hidden, intermediate, heads, kv heads, vocab, visual tokens per default image),
# the numbers of the published hub config.json files
SHIPPED = {
    "llava-1.5-7b": ("LlavaForConditionalGeneration", 32, 4096, 11008, 32, 32, 32064, 576),
    "llava-1.5-13b": ("LlavaForConditionalGeneration", 40, 5120, 13824, 40, 40, 32064, 576),
    "llava-next-7b": ("LlavaNextForConditionalGeneration", 32, 4096, 11008, 32, 32, 32064, 2928),
    "qwen2-vl-2b": ("Qwen2VLForConditionalGeneration", 28, 1536, 8960, 12, 2, 151936, 256),
    "qwen2-vl-7b": ("Qwen2VLForConditionalGeneration", 28, 3584, 18944, 28, 4, 152064, 256),
    "llava-onevision-7b": ("LlavaOnevisionForConditionalGeneration", 28, 3584, 18944, 28, 4, 152128, 3699),
    "qwen2.5-vl-7b": ("Qwen2_5_VLForConditionalGeneration", 28, 3584, 18944, 28, 4, 152064, 256),
    "qwen3-vl-8b": ("Qwen3VLForConditionalGeneration", 36, 4096, 12288, 32, 8, 151936, 196),  # 16 px patches
}
# name -> (depth, width, intermediate, heads, patch, out width, full-attention blocks / DeepStack layers),
# the vision towers of the published config.json files
TOWERS = {
    "qwen2.5-vl-7b": (32, 1280, 3420, 16, 14, 3584, [7, 15, 23, 31]),
    "qwen3-vl-8b": (27, 1152, 4304, 16, 16, 4096, [8, 16, 24]),
}


def test_llava_7b_paper_numbers():
    rep = fr.flops_report("llava-1.5-7b", ["baseline", "pdrop:layers=8+16+24,ratio=0.5"])
    base, pdrop = rep["plans"]
    assert round(base["paper_tflops"], 2) == 3.82
    assert round(pdrop["paper_tflops"], 2) == 1.78
    assert pdrop["visual_tokens_per_layer"] == [576] * 8 + [288] * 8 + [144] * 8 + [72] * 8
    text = AutoConfig.from_pretrained(fr.CONFIG_DIR / "llava-1.5-7b").text_config
    tokens = [576 + 64] * 32
    assert base["decoder_flops"] == decoder_linear_flops(text, tokens) + attention_flops(text, tokens)
    assert rep["vision_tower_tflops"] > 0 and rep["projector_tflops"] > 0 and rep["vision_error"] is None


def _small_llava() -> LlavaConfig:
    return llava_config(
        64,
        4,
        image_size=56,
        vision_hidden=32,
        heads=4,
        kv_heads=2,
        intermediate=128,
        vocab=100,
        image_token_id=99,
        max_positions=256,
    )


def test_counted_decoder_equals_formula_small_config():
    cfg = _small_llava()
    rep = fr.flops_report(cfg, ["baseline", "fastv:layer=2,ratio=0.5"], visual_tokens=16, text_tokens=8)
    base, fastv = rep["plans"]
    assert fastv["visual_tokens_per_layer"] == [16, 16, 8, 8]
    # by hand, d=64, m=128, 4 heads of 16, 2 K/V heads: per token 2 * (64*64 + 2*64*32 + 64*64 + 3*64*128)
    # = 73728 FLOPs of projections and MLP; dense attention 4 * n^2 * 64
    layer24 = 24 * 73728 + 4 * 24 * 24 * 64  # 1_916_928
    layer16 = 16 * 73728 + 4 * 16 * 16 * 64  # 1_245_184
    assert base["decoder_flops"] == 4 * layer24 == 7_667_712
    assert fastv["decoder_flops"] == 2 * layer24 + 2 * layer16 == 6_324_224
    tokens = [n + 8 for n in fastv["visual_tokens_per_layer"]]
    expected = decoder_linear_flops(cfg.text_config, tokens) + attention_flops(cfg.text_config, tokens)
    assert fastv["decoder_flops"] == expected
    assert rep["vision_tower_tflops"] > 0 and rep["visual_tokens"] == 16


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_config_counts(name):
    arch, layers, d, m, heads, kv, vocab, n_visual = SHIPPED[name]
    cfg = AutoConfig.from_pretrained(fr.CONFIG_DIR / name)
    text = cfg.text_config
    assert cfg.architectures == [arch]
    assert (text.num_hidden_layers, text.hidden_size, text.intermediate_size) == (layers, d, m)
    assert (text.num_attention_heads, text.num_key_value_heads, text.vocab_size) == (heads, kv, vocab)
    rep = fr.flops_report(name, ["baseline", "fastv:layer=2,keep=0.25"])
    assert rep["architecture"] == arch and rep["visual_tokens"] == n_visual
    base, fastv = rep["plans"]
    assert 0 < fastv["decoder_flops"] < base["decoder_flops"]
    assert 0 < fastv["paper_tflops"] < base["paper_tflops"]
    assert rep["vision_tower_tflops"] > 0 and rep["projector_tflops"] > 0
    table = fr.format_flops_table(rep)
    assert table.count("\n| ") == 3 and "fastv:layer=2,keep=0.25" in table


def test_shipped_configs_load_offline(monkeypatch):
    import transformers.utils.hub as hub

    def no_network(*args, **kwargs):
        raise AssertionError("a shipped config tried to reach the hub")

    monkeypatch.setattr(hub, "hf_hub_download", no_network)
    monkeypatch.setattr(hub, "snapshot_download", no_network)
    monkeypatch.setattr(hub, "hf_api", no_network)
    sizes = [fr.load_config(name).text_config.hidden_size for name in sorted(SHIPPED)]
    assert sizes == [SHIPPED[n][2] for n in sorted(SHIPPED)]
    sizes = [AutoConfig.from_pretrained(fr.CONFIG_DIR / n).text_config.hidden_size for n in sorted(SHIPPED)]
    assert sizes == [SHIPPED[n][2] for n in sorted(SHIPPED)]


@pytest.mark.parametrize("name", sorted(TOWERS))
def test_newer_qwen_towers_and_their_counts(name):
    """The tower fields of the shipped Qwen2.5-VL / Qwen3-VL configs, and the counted projector:
    Qwen3-VL's merger and its three DeepStack mergers (each 2x2 patches -> fc1 -> fc2) all run."""
    depth, width, inter, heads, patch, out, special = TOWERS[name]
    cfg = fr.load_config(name)
    vc = cfg.vision_config
    assert (vc.depth, vc.hidden_size, vc.intermediate_size, vc.num_heads, vc.patch_size) == (
        depth,
        width,
        inter,
        heads,
        patch,
    )
    assert vc.out_hidden_size == out and vc.spatial_merge_size == 2
    listed = vc.fullatt_block_indexes if name.startswith("qwen2.5") else vc.deepstack_visual_indexes
    assert list(listed) == special
    adapter = fr.adapter_for(fr.build_meta_model(cfg))
    call, _ = fr._image_call(adapter, None)
    tower, proj = fr.count_vision(adapter, call)
    tokens = adapter.image_specs(call)[0].num_tokens
    merged = 4 * width
    per_merger = 2 * tokens * (merged * merged + merged * out)
    mergers = 1 + len(getattr(vc, "deepstack_visual_indexes", ()))
    assert proj == mergers * per_merger
    # the blocks' projections and MLP alone, per patch: qkv + proj (4 w^2) and the MLP (2 or 3 w*m)
    mlp = 3 if name.startswith("qwen2.5") else 2  # gated SiLU MLP vs fc1/fc2
    assert tower > 2 * 4 * tokens * depth * (4 * width * width + mlp * width * inter)
    if name == "qwen3-vl-8b":
        text = cfg.text_config
        assert text.head_dim == 128 and text.rope_parameters["mrope_section"] == [24, 20, 20]
        assert text.rope_parameters["mrope_interleaved"] is True
        n = 196 + 64
        counted = fr.count_decoder_layer(adapter, n)
        assert counted == decoder_linear_flops(text, [n]) + attention_flops(text, [n])


def test_unknown_model_lists_shipped_names():
    with pytest.raises(ValueError, match="unknown model 'llava-9b'") as err:
        fr.flops_report("llava-9b", ["baseline"])
    for name in SHIPPED:
        assert name in str(err.value)


def test_folder_path_and_overrides():
    folder = str(fr.CONFIG_DIR / "qwen2-vl-2b")
    assert fr.config_source(folder) == folder
    rep = fr.flops_report(folder, ["baseline"], image_size=(672, 672))
    assert rep["visual_tokens"] == 576 and rep["image_size"] == [672, 672]  # (48 x 48 patches) / 4
    assert (
        fr.flops_report(folder, ["baseline"], visual_tokens=100)["plans"][0]["visual_tokens_per_layer"]
        == [100] * 28
    )


def test_docstring_examples():
    result = doctest.testmod(fr, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize(
    "size, crops, tokens",
    [
        ((768, 768), 5, 729 + 54 * 55),  # 2 x 2 tiles of 27 x 27, 54 rows + newlines, under the cap
        ((1536, 1536), 17, 729 + 81 * 82),  # 4 x 4 tiles (108 x 108) downscaled to 81 x 81 by anyres_max_9
    ],
)
def test_llava_onevision_7b_counts(size, crops, tokens):
    rep = fr.flops_report("llava-onevision-7b", ["baseline", "hired:keep=0.25"], image_size=size)
    assert rep["visual_tokens"] == tokens and rep["vision_error"] is None
    cfg = AutoConfig.from_pretrained(fr.CONFIG_DIR / "llava-onevision-7b")
    vc, text = cfg.vision_config, cfg.text_config
    assert (vc.hidden_size, vc.num_hidden_layers, vc.image_size, vc.patch_size) == (1152, 26, 384, 14)
    # SigLIP has no CLS token: the projector maps 729 tokens per crop (2 FLOPs per multiply-add)
    assert rep["projector_tflops"] * 1e12 == 2 * crops * 729 * (1152 * 3584 + 3584 * 3584)
    base, hired = rep["plans"]
    counted = [n + 64 for n in base["visual_tokens_per_layer"]]
    assert base["decoder_flops"] == decoder_linear_flops(text, counted) + attention_flops(text, counted)
    assert hired["llm_input_visual_tokens"] == round(0.25 * tokens)
