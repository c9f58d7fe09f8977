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
