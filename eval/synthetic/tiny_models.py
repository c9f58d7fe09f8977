"""Tiny, fully offline LLaVA-1.5 and Qwen2-VL architecture models for the SynthVQA task.

Everything (word-level tokenizer, image processor, processor, model config) is built locally from code so
nothing is fetched from the Hugging Face hub. The trained checkpoints ship in ``vtprune/assets/`` and load
with the stock classes::

    from transformers import AutoProcessor, LlavaForConditionalGeneration
    model = LlavaForConditionalGeneration.from_pretrained(asset_dir("llava"))
    processor = AutoProcessor.from_pretrained(asset_dir("llava"))

Architectures (defaults, see :data:`DEFAULT_SIZES`):

* ``llava``: CLIP ViT (patch 16 on 192x192 -> 12x12 = 144 patch tokens + CLS), ``vision_feature_layer=-2``,
  ``"default"`` strategy (CLS dropped), 2-layer GELU MLP projector, Llama decoder. 144 visual tokens.
* ``qwen2_vl``: Qwen2-VL ViT (patch 12 -> 16x16 patches, 2x2 patch merger -> 8x8 = 64 visual tokens),
  M-RoPE and grouped-query attention (4 query / 2 key-value heads) in the Qwen2 decoder.

Example:
    >>> model, processor = build_tiny("llava", seed=0)
    >>> sum(p.numel() for p in model.parameters()) < 5_000_000
    True
"""

from __future__ import annotations

import copy
import os
from importlib import resources

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
)

from .synthvqa import ARCHS, DEFAULT_IMAGE_SIZE, task_vocabulary

__all__ = [
    "ASSET_NAMES",
    "DEFAULT_SIZES",
    "asset_dir",
    "build_config",
    "build_processor",
    "build_tiny",
    "build_tokenizer",
    "load_tiny",
    "num_image_tokens",
    "save_tiny",
]

# shipped checkpoints by name; "llava_noattn" is the tiny LLaVA's twin trained without the
# answer-attention loss (same architecture and prompt as "llava")
ASSET_NAMES = {
    "llava": "tiny-llava-synthvqa",
    "qwen2_vl": "tiny-qwen2vl-synthvqa",
    "llava_noattn": "tiny-llava-synthvqa-noattn",
    "qwen2_vl_video": "tiny-qwen2vl-synthvqa-video",
}

# Sizes chosen for ~20 minutes of CPU training each and checkpoints of a few MB (float32).
DEFAULT_SIZES: dict[str, dict] = {
    "llava": {
        "patch_size": 16,  # 192 / 16 = 12 -> 144 visual tokens
        "vision_hidden": 128,
        "vision_layers": 4,  # the last layer is unused: LLaVA reads hidden_states[-2]
        "vision_init_factor": 1.0,
        # CLIP initialises position embeddings at std 0.02 while a plain patch embeds at ~3 per channel, so
        # after the pre-LayerNorm the tokens barely know where they are and a tower trained from scratch
        # needs thousands of steps to learn positions. Started at std 1, positions are there from step 0.
        "vision_position_std": 1.0,
        "vision_heads": 4,
        "text_hidden": 128,
        "text_layers": 12,
        "text_heads": 4,
        "text_kv_heads": 4,  # LLaVA-1.5's Vicuna uses plain multi-head attention
        "text_intermediate": 384,
        "init_std": 0.08,  # ~1/sqrt(hidden): HF's 0.02 leaves attention uniform for hundreds of steps
    },
    "qwen2_vl": {
        "patch_size": 12,  # 192 / 12 = 16 patches per side, merged 2x2 -> 8x8 = 64 visual tokens
        "vision_hidden": 96,
        "vision_layers": 4,
        "vision_heads": 4,
        "text_hidden": 128,
        "text_layers": 12,
        "text_heads": 4,
        "text_kv_heads": 2,  # grouped-query attention as in Qwen2
        "text_intermediate": 384,
        "init_std": 0.08,  # ~1/sqrt(hidden): HF's 0.02 leaves attention uniform for hundreds of steps
    },
}

_SPECIALS = {
    "llava": ["<unk>", "<s>", "</s>", "<pad>", "<image>"],
    "qwen2_vl": [
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "<|vision_start|>",
        "<|vision_end|>",
        "<|image_pad|>",
        "<|video_pad|>",
        "<unk>",
    ],
}
_PROMPT_WORDS = ["user", "assistant", "system", ":"]  # chat-role words of both prompt formats

# Chat templates reproducing synthvqa.build_prompt for a user turn [image, text] + generation prompt.
_CHAT_TEMPLATES = {
    "llava": (
        "{% for m in messages %}"
        "{% if m['role'] == 'user' %}{% if not loop.first %} {% endif %}USER: "
        "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
        "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
        "{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
        "{% endif %}"
        "{% elif m['role'] == 'assistant' %} ASSISTANT: "
        "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
        "{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
        "{% endif %}</s>"
        "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %} ASSISTANT:{% endif %}"
    ),
    "qwen2_vl": (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
        "{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
        "{% elif c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
        "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
        "{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
}


def _arch(arch: str) -> str:
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    return arch


def build_tokenizer(arch: str, extra_words: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """Word-level fast tokenizer over the SynthVQA vocabulary plus the architecture's special tokens.

    ``extra_words`` (the video questions' words) are appended after the image vocabulary, so every
    image word keeps its id and a video model can start from an image model's embeddings.

    Lower-cases its input and splits on whitespace and punctuation, so ``"Is there a red circle?"``
    tokenises like ``"is there a red circle ?"``. The LLaVA tokenizer prepends ``<s>`` like Llama's.

    Example:
        >>> tok = build_tokenizer("llava")
        >>> tok.convert_ids_to_tokens(tok("Is there a red circle?").input_ids)
        ['<s>', 'is', 'there', 'a', 'red', 'circle', '?']
    """
    specials = _SPECIALS[_arch(arch)]
    words = [w for w in _PROMPT_WORDS + task_vocabulary() if w not in specials]
    words += [w for w in dict.fromkeys(extra_words) if w not in words and w not in specials]
    vocab = {t: i for i, t in enumerate(specials + words)}
    unk = "<unk>"
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")]
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    tok.add_special_tokens(specials)
    if arch == "llava":
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
        )
        names = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": unk}
    else:
        names = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": unk}
    return PreTrainedTokenizerFast(tokenizer_object=tok, padding_side="left", model_max_length=512, **names)


def build_processor(
    arch: str,
    image_size: int = DEFAULT_IMAGE_SIZE,
    patch_size: int | None = None,
    extra_words: tuple[str, ...] = (),
):
    """LlavaProcessor (CLIPImageProcessor) or Qwen2VLProcessor whose image grid is fixed for square input.

    Example:
        >>> processor = build_processor("qwen2_vl")
        >>> num_image_tokens(processor, "qwen2_vl")
        64
    """
    tokenizer = build_tokenizer(arch, extra_words)
    patch = patch_size or DEFAULT_SIZES[arch]["patch_size"]
    template = _CHAT_TEMPLATES[arch]
    if arch == "llava":
        image_processor = CLIPImageProcessor(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
        )
        # CLIP emits CLS + patches (num_additional_image_tokens=1); "default" drops CLS again
        return LlavaProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=patch,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
            chat_template=template,
        )
    from transformers import Qwen2VLVideoProcessor

    pixels = image_size * image_size  # min == max: every square image maps to the same grid
    grid = {"min_pixels": pixels, "max_pixels": pixels, "patch_size": patch, "merge_size": 2}
    return Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(temporal_patch_size=2, **grid),
        tokenizer=tokenizer,
        # every frame gets the image grid (the per-frame cap only matters for frames above max_pixels)
        video_processor=Qwen2VLVideoProcessor(temporal_patch_size=2, cap_pixels_per_frame=True, **grid),
        chat_template=template,
    )


def num_image_tokens(processor, arch: str, image_size: int = DEFAULT_IMAGE_SIZE) -> int:
    """Visual tokens one ``image_size`` square image expands to (from the processor itself).

    Example:
        >>> num_image_tokens(build_processor("llava"), "llava")
        144
    """
    from PIL import Image

    from .synthvqa import build_prompt

    image = Image.new("RGB", (image_size, image_size))
    batch = processor(images=[image], text=[build_prompt("is there a red circle ?", arch)])
    token = processor.image_token_id
    return int(sum(int(t == token) for t in batch["input_ids"][0]))


def build_config(arch: str, tokenizer=None, image_size: int = DEFAULT_IMAGE_SIZE, **overrides):
    """LlavaConfig / Qwen2VLConfig for the tiny model; ``overrides`` replace entries of DEFAULT_SIZES.

    Example:
        >>> build_config("qwen2_vl").text_config.num_key_value_heads
        2
    """
    s = {**DEFAULT_SIZES[_arch(arch)], **overrides}
    tok = tokenizer or build_tokenizer(arch)
    vocab = -(-len(tok) // 16) * 16  # round up: a few spare ids, tidy shapes
    ids = {t: tok.convert_tokens_to_ids(t) for t in _SPECIALS[arch]}
    text = {
        "vocab_size": vocab,
        "hidden_size": s["text_hidden"],
        "intermediate_size": s["text_intermediate"],
        "num_hidden_layers": s["text_layers"],
        "num_attention_heads": s["text_heads"],
        "num_key_value_heads": s["text_kv_heads"],
        "max_position_embeddings": 512,
        "tie_word_embeddings": False,
        "initializer_range": s["init_std"],
    }
    if arch == "llava":
        grid = image_size // s["patch_size"]
        vision = CLIPVisionConfig(
            hidden_size=s["vision_hidden"],
            intermediate_size=4 * s["vision_hidden"],
            num_hidden_layers=s["vision_layers"],
            num_attention_heads=s["vision_heads"],
            image_size=image_size,
            patch_size=s["patch_size"],
            projection_dim=s["vision_hidden"],
            hidden_act="quick_gelu",
            initializer_factor=s["vision_init_factor"],
        )
        text_config = LlamaConfig(
            **text, bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"]
        )
        return LlavaConfig(
            vision_config=vision,
            text_config=text_config,
            image_token_index=ids["<image>"],
            image_seq_length=grid * grid,
            projector_hidden_act="gelu",
            vision_feature_select_strategy="default",
            vision_feature_layer=-2,
            tie_word_embeddings=False,
        )
    head_dim = s["text_hidden"] // s["text_heads"]
    # M-RoPE splits the rotary half-dim into (temporal, height, width) sections; Qwen2-VL uses 16/24/24
    # of 64. Keep the same proportions (1/4, 3/8, 3/8).
    t_sec = head_dim // 8
    h_sec = (head_dim // 2 - t_sec) // 2
    mrope = [t_sec, h_sec, head_dim // 2 - t_sec - h_sec]
    text_config = {
        **text,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope},
        "bos_token_id": None,
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
    }
    vision = {
        "depth": s["vision_layers"],
        "embed_dim": s["vision_hidden"],
        "hidden_size": s["text_hidden"],  # output width of the patch merger
        "num_heads": s["vision_heads"],
        "mlp_ratio": 4,
        "patch_size": s["patch_size"],
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "hidden_act": "quick_gelu",
        "initializer_range": s["init_std"],
    }
    return Qwen2VLConfig(
        text_config=text_config,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )


def build_tiny(
    arch: str,
    seed: int = 0,
    image_size: int = DEFAULT_IMAGE_SIZE,
    extra_words: tuple[str, ...] = (),
    **overrides,
):
    """Freshly initialised (untrained) tiny model and its processor: ``(model, processor)``.

    Example:
        >>> model, processor = build_tiny("qwen2_vl", seed=0)
        >>> type(model).__name__
        'Qwen2VLForConditionalGeneration'
    """
    processor = build_processor(arch, image_size, overrides.get("patch_size"), extra_words)
    config = build_config(arch, processor.tokenizer, image_size, **overrides)
    torch.manual_seed(seed)
    cls = LlavaForConditionalGeneration if arch == "llava" else Qwen2VLForConditionalGeneration
    model = cls(config)
    if arch == "llava":
        s = {**DEFAULT_SIZES["llava"], **overrides}
        torch.nn.init.normal_(
            model.model.vision_tower.embeddings.position_embedding.weight, std=s["vision_position_std"]
        )
    tok = processor.tokenizer
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        do_sample=False,
        max_new_tokens=4,  # every answer is one word + end-of-turn
    )
    return model, processor


def save_tiny(model, processor, out_dir: str) -> None:
    """Save model (float32 safetensors) and processor into one folder loadable with from_pretrained.

    Example:
        >>> save_tiny(*build_tiny("llava"), "/tmp/tiny-llava")  # doctest: +SKIP
    """
    os.makedirs(out_dir, exist_ok=True)
    model = copy.deepcopy(model).to(torch.float32)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)


def asset_dir(name: str) -> str:
    """Folder of the shipped trained checkpoint ``name`` (a key of ``ASSET_NAMES``) inside the
    installed vtprune package.

    Example:
        >>> os.path.basename(asset_dir("llava"))
        'tiny-llava-synthvqa'
        >>> os.path.basename(asset_dir("llava_noattn"))
        'tiny-llava-synthvqa-noattn'
    """
    if name not in ASSET_NAMES:
        raise ValueError(f"shipped tiny models: {', '.join(ASSET_NAMES)}; got {name!r}")
    return str(resources.files("vtprune") / "assets" / ASSET_NAMES[name])


def load_tiny(arch_or_dir: str, dtype: torch.dtype = torch.float32):
    """Load a shipped (a key of ``ASSET_NAMES``) or saved tiny model: ``(model.eval(), processor)``.

    Example:
        >>> model, processor = load_tiny("qwen2_vl")  # doctest: +SKIP
    """
    from transformers import AutoConfig, AutoProcessor

    path = asset_dir(arch_or_dir) if arch_or_dir in ASSET_NAMES else arch_or_dir
    config = AutoConfig.from_pretrained(path)
    cls = LlavaForConditionalGeneration if config.model_type == "llava" else Qwen2VLForConditionalGeneration
    model = cls.from_pretrained(path, dtype=dtype)
    return model.eval(), AutoProcessor.from_pretrained(path)
