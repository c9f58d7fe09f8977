"""Tiny LLaVA-1.5 / LLaVA-NeXT / Qwen2-VL / Qwen2.5-VL / Qwen3-VL models built from configs, and inputs for them.

Random weights, offline, a few MB each: what the equivalence tests need. Each builder returns
the model in eval mode; each input builder returns the kwargs a processor would.
"""

from __future__ import annotations

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    SiglipVisionConfig,
)

VOCAB = 128
IMAGE = 120  # image placeholder id
VIDEO = 121
VSTART = 122
VEND = 123
PAD = 0
LAYERS = 8


def _text(**kw):
    base = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=PAD,
        bos_token_id=1,
        eos_token_id=2,
    )
    base.update(kw)
    return base


def _clip(image_size: int = 32, patch_size: int = 4, layers: int = 3):
    return CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
    )


def _finish(model, attn):
    model.set_attn_implementation(attn)
    return model.eval()


def llava(
    attn: str = "sdpa", seed: int = 0, dtype=torch.float32, strategy: str = "default", tower_layers: int = 3
):
    """``strategy="full"`` keeps the CLS token as an image token (65 per image instead of 64)."""
    torch.manual_seed(seed)
    cfg = LlavaConfig(
        vision_config=_clip(layers=tower_layers),
        text_config=LlamaConfig(**_text()),
        image_token_id=IMAGE,
        vision_feature_layer=-2,
        vision_feature_select_strategy=strategy,
    )
    return _finish(LlavaForConditionalGeneration(cfg).to(dtype), attn)


def llava_next(
    attn: str = "sdpa",
    seed: int = 0,
    dtype=torch.float32,
    crop: int = 32,
    patch: int = 4,
    tower_layers: int = 3,
):
    """``crop``-pixel crops of ``(crop / patch)**2`` tokens each; grids up to 2 x 2 crops."""
    torch.manual_seed(seed)
    cfg = LlavaNextConfig(
        vision_config=_clip(crop, patch, tower_layers),
        text_config=LlamaConfig(**_text()),
        image_token_id=IMAGE,
        image_grid_pinpoints=[[crop, 2 * crop], [2 * crop, crop], [2 * crop, 2 * crop]],
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    return _finish(LlavaNextForConditionalGeneration(cfg).to(dtype), attn)


def qwen2_vl(attn: str = "sdpa", seed: int = 0, dtype=torch.float32, tower_depth: int = 2, **text_kw):
    """Tiny Qwen2-VL; ``text_kw`` overrides text-config fields (e.g. sliding-window layer types)."""
    torch.manual_seed(seed)
    text = _text(
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}, **text_kw
    )
    cfg = Qwen2VLConfig(
        vision_config=dict(
            depth=tower_depth,
            embed_dim=32,
            hidden_size=64,
            num_heads=2,
            patch_size=4,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        text_config=text,
        image_token_id=IMAGE,
        video_token_id=VIDEO,
        vision_start_token_id=VSTART,
    )
    return _finish(Qwen2VLForConditionalGeneration(cfg).to(dtype), attn)


def _qwen_tower(depth: int = 3, **extra) -> dict:
    """The tiny 3-block tower of the Qwen2.5-VL / Qwen3-VL configs (4 px patches, 2x2 merge,
    2-frame tubelets), plus each family's own fields."""
    return dict(
        depth=depth,
        hidden_size=32,
        intermediate_size=64,
        out_hidden_size=64,
        num_heads=2,
        patch_size=4,
        spatial_merge_size=2,
        temporal_patch_size=2,
        **extra,
    )


def qwen2_5_vl(
    attn: str = "sdpa", seed: int = 0, dtype=torch.float32, fullatt=(1,), tower_depth: int = 3, **text_kw
):
    """Tiny Qwen2.5-VL: 3 tower blocks, window attention except ``fullatt`` (default block 1, so
    the last block is a window block), windows of 2x2 merge units (16 px / 4 px patches / merge 2)."""
    torch.manual_seed(seed)
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    cfg = Qwen2_5_VLConfig(
        vision_config=_qwen_tower(tower_depth, window_size=16, fullatt_block_indexes=list(fullatt)),
        text_config=_text(rope_parameters=rope, **text_kw),
        image_token_id=IMAGE,
        video_token_id=VIDEO,
        vision_start_token_id=VSTART,
    )
    return _finish(Qwen2_5_VLForConditionalGeneration(cfg).to(dtype), attn)


def llava_onevision(attn: str = "sdpa", seed: int = 0, dtype=torch.float32, crop: int = 20, **text_kw):
    """Tiny LLaVA-OneVision: SigLIP crops of 20 px / 4 px patches (5 x 5 tokens, no CLS), tile
    grids up to 3 x 3 and ``anyres_max_2``, so a 2 x 2 grid (10 x 10 tokens) is downscaled to 7 x 7
    and a 1 x 2 grid is not; video frames pool 5 x 5 to 3 x 3. ``crop=40``: 10 x 10 tokens a crop."""
    torch.manual_seed(seed)
    cfg = _onevision_config(crop, **text_kw)
    return _finish(LlavaOnevisionForConditionalGeneration(cfg).to(dtype), attn)


def onevision_pixels(cfg, sizes, gen) -> dict:
    """``pixel_values`` (padded to the most tiles) and ``image_sizes`` for images of ``sizes``."""
    from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

    crop = cfg.vision_config.image_size
    n_patch = [image_size_to_num_patches(list(s), cfg.image_grid_pinpoints, crop) for s in sizes]
    pv = torch.zeros(len(sizes), max(n_patch), 3, crop, crop)
    for i, p in enumerate(n_patch):
        pv[i, :p] = torch.randn(p, 3, crop, crop, generator=gen)
    return {"pixel_values": pv, "image_sizes": torch.tensor(sizes)}


def qwen3_vl(attn: str = "sdpa", seed: int = 0, dtype=torch.float32, deepstack=(0, 1, 2), **text_kw):
    """Tiny Qwen3-VL: 3 tower blocks, each feeding DeepStack by default (so features are added
    after decoder layers 0, 1 and 2, as on the released models), interleaved M-RoPE."""
    torch.manual_seed(seed)  # the weights must not depend on whatever ran before (module-scoped fixtures)
    rope = {
        "rope_type": "default",
        "rope_theta": 10000.0,
        "mrope_section": [4, 2, 2],
        "mrope_interleaved": True,
    }
    cfg = Qwen3VLConfig(
        vision_config=_qwen_tower(num_position_embeddings=16, deepstack_visual_indexes=list(deepstack)),
        text_config=_text(rope_parameters=rope, head_dim=16, **text_kw),
        image_token_id=IMAGE,
        video_token_id=VIDEO,
        vision_start_token_id=VSTART,
        vision_end_token_id=VEND,
    )
    return _finish(Qwen3VLForConditionalGeneration(cfg).to(dtype), attn)


BUILDERS = {
    "llava": llava,
    "llava_next": llava_next,
    "qwen2_vl": qwen2_vl,
    "qwen2_5_vl": qwen2_5_vl,
    "qwen3_vl": qwen3_vl,
    "llava_onevision": llava_onevision,
}
QWEN = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


def _prompt(
    n_image_tokens: list[int],
    pre: int,
    post: int,
    gen: torch.Generator,
    vstart: bool,
    kinds=None,
    stamps=None,
):
    """``stamps[i]``: medium ``i`` is written as that many frames, each after a 2-token timestamp
    and between vision start / end tokens (Qwen3-VL's video layout)."""
    ids = [1] + torch.randint(3, 100, (pre,), generator=gen).tolist()
    for i, n in enumerate(n_image_tokens):
        token = VIDEO if kinds is not None and kinds[i] == "v" else IMAGE
        if stamps is not None and stamps[i] > 1:
            for _ in range(stamps[i]):
                ids += torch.randint(3, 100, (2,), generator=gen).tolist()
                ids += [VSTART] + [token] * (n // stamps[i]) + [VEND]
            continue
        if vstart:
            ids.append(VSTART)
        ids += [token] * n
        ids += torch.randint(3, 100, (2,), generator=gen).tolist()
    ids += torch.randint(3, 100, (post,), generator=gen).tolist()
    return ids


def _pad(rows: list[list[int]], side: str):
    n = max(map(len, rows))
    ids = torch.full((len(rows), n), PAD, dtype=torch.long)
    mask = torch.zeros(len(rows), n, dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(n - len(r), n) if side == "left" else slice(0, len(r))
        ids[i, sl] = torch.tensor(r)
        mask[i, sl] = 1
    return ids, mask


def inputs(
    family: str, model, images_per_row: list[int], *, side: str = "left", seed: int = 0, sizes=None, post=None
):
    """Processor-like kwargs: rows with ``images_per_row[b]`` images each (0 = text only).

    ``sizes`` (LLaVA-NeXT: (h, w) per image; Qwen: (h, w) patch grid per image) vary the
    number of visual tokens per image.
    """
    gen = torch.Generator().manual_seed(seed)
    n_images = sum(images_per_row)
    kw: dict = {}
    if family == "llava":
        counts = [64 + (model.config.vision_feature_select_strategy == "full")] * n_images
        kw["pixel_values"] = torch.randn(n_images, 3, 32, 32, generator=gen)
    elif family == "llava_next":
        from vtprune.integrations.llava_next import LlavaNextAdapter

        sizes = sizes or [(32, 64)] * n_images
        ad = LlavaNextAdapter(model)
        counts = [ad._spec(list(s)).num_tokens for s in sizes]
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        crop = model.config.vision_config.image_size
        n_patch = [image_size_to_num_patches(list(s), model.config.image_grid_pinpoints, crop) for s in sizes]
        pv = torch.zeros(n_images, max(n_patch), 3, crop, crop)
        for i, p in enumerate(n_patch):
            pv[i, :p] = torch.randn(p, 3, crop, crop, generator=gen)
        kw["pixel_values"] = pv
        kw["image_sizes"] = torch.tensor(sizes)
    elif family == "llava_onevision":
        from vtprune.integrations.llava_onevision import image_spec

        sizes = sizes or [(20, 40)] * n_images
        counts = [image_spec(model.config, list(s)).num_tokens for s in sizes]
        kw.update(onevision_pixels(model.config, sizes, gen))
    else:
        # Qwen2.5-VL: smaller default images (still 6 windows each) keep its share of the suite short
        sizes = sizes or [(16, 16) if family == "qwen2_vl" else (8, 12)] * n_images
        counts = [h * w // 4 for h, w in sizes]
        kw["pixel_values"] = torch.randn(sum(h * w for h, w in sizes), 3 * 2 * 4 * 4, generator=gen)
        kw["image_grid_thw"] = torch.tensor([[1, h, w] for h, w in sizes])
    rows, k = [], 0
    for b, m in enumerate(images_per_row):
        p = post[b] if post is not None else 3 + b
        rows.append(_prompt(counts[k : k + m], pre=2 + b, post=p, gen=gen, vstart=family in QWEN))
        k += m
    ids, mask = _pad(rows, side)
    kw.update(input_ids=ids, attention_mask=mask)
    if family in QWEN:
        kw["mm_token_type_ids"] = (ids == IMAGE).int()
    if n_images == 0:
        for key in ("pixel_values", "image_sizes", "image_grid_thw"):
            kw.pop(key, None)
    return kw


def media_inputs(
    family: str, media: list[str], *, side="left", seed=0, sizes=None, post=None, frames=2, cfg=None
):
    if family == "llava_onevision":  # cfg: the model's config (default: the tiny one's)
        cfg = cfg or _onevision_config()
        return _onevision_media(media, cfg, side=side, seed=seed, sizes=sizes, post=post, frames=frames)
    """Qwen kwargs for rows of images and videos: ``media[b]`` spells row ``b``'s media in prompt
    order (``"ivi"``: image, video, image; ``""``: text only). Videos have ``frames`` temporal
    patches (``video_grid_thw`` t); ``mm_token_type_ids`` marks images 1 and videos 2, as the
    processor does. ``sizes``: (h, w) patch grid per medium, in batch order."""
    gen = torch.Generator().manual_seed(seed)
    kinds = "".join(media)
    sizes = sizes or [(8, 8) if family == "qwen2_vl" else (8, 12)] * len(kinds)
    grids = [[frames if k == "v" else 1, h, w] for k, (h, w) in zip(kinds, sizes)]
    counts = [t * h * w // 4 for t, h, w in grids]
    kw: dict = {}
    for k, pv, key in (
        ("i", "pixel_values", "image_grid_thw"),
        ("v", "pixel_values_videos", "video_grid_thw"),
    ):
        g = [grid for kind, grid in zip(kinds, grids) if kind == k]
        if g:
            kw[pv] = torch.randn(sum(t * h * w for t, h, w in g), 3 * 2 * 4 * 4, generator=gen)
            kw[key] = torch.tensor(g)
    rows, k = [], 0
    for b, m in enumerate(media):
        p = post[b] if post is not None else 3 + b
        # Qwen3-VL writes each frame of a video after its timestamp (text tokens)
        stamps = [frames if kind == "v" and family == "qwen3_vl" else 1 for kind in m]
        rows.append(
            _prompt(counts[k : k + len(m)], pre=2 + b, post=p, gen=gen, vstart=True, kinds=m, stamps=stamps)
        )
        k += len(m)
    ids, mask = _pad(rows, side)
    kw.update(input_ids=ids, attention_mask=mask)
    kw["mm_token_type_ids"] = ((ids == IMAGE).int() + 2 * (ids == VIDEO).int()).int()
    return kw


def _onevision_media(media, cfg, *, side, seed, sizes, post, frames):
    """LLaVA-OneVision kwargs for rows of images (``sizes``: (h, w) pixels each, in batch order)
    and videos of ``frames`` frames (``ceil(5 / 2)**2`` tokens each, plus one newline a clip)."""
    from vtprune.integrations.llava_onevision import image_spec, video_spec

    gen = torch.Generator().manual_seed(seed)
    kinds = "".join(media)
    n_img = kinds.count("i")
    crop = cfg.vision_config.image_size
    sizes = sizes or [(crop, 2 * crop)] * n_img
    img_counts = iter([image_spec(cfg, list(s)).num_tokens for s in sizes])
    vid_count = video_spec(cfg, frames).num_tokens
    counts = [next(img_counts) if k == "i" else vid_count for k in kinds]
    kw: dict = {}
    if n_img:
        kw.update(onevision_pixels(cfg, sizes, gen))
    if "v" in kinds:
        kw["pixel_values_videos"] = torch.randn(kinds.count("v"), frames, 3, crop, crop, generator=gen)
    rows, k = [], 0
    for b, m in enumerate(media):
        p = post[b] if post is not None else 3 + b
        rows.append(_prompt(counts[k : k + len(m)], pre=2 + b, post=p, gen=gen, vstart=False, kinds=m))
        k += len(m)
    ids, mask = _pad(rows, side)
    kw.update(input_ids=ids, attention_mask=mask)
    return kw


def _onevision_config(crop: int = 20, **text_kw):
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2)
    return LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(image_size=crop, patch_size=4, **tower),
        text_config=dict(model_type="qwen2", **_text(**text_kw)),
        image_token_index=IMAGE,
        video_token_index=VIDEO,
        image_grid_pinpoints=[[crop, 2 * crop], [2 * crop, crop], [2 * crop, 2 * crop], [3 * crop, 3 * crop]],
        vision_aspect_ratio="anyres_max_2",
    )


def llava_shaped(layers: int = 32, seed: int = 0):
    """LLaVA-1.5 token geometry (336 px / 14 = 576 visual tokens, 32 layers) at a tiny width."""
    from vtprune.eval.speed.shapes import llava_config

    torch.manual_seed(seed)
    cfg = llava_config(
        32,
        layers,
        vision_hidden=16,
        heads=2,
        intermediate=64,
        vocab=VOCAB,
        image_token_id=IMAGE,
        max_positions=1024,
        pad_token_id=PAD,
        bos_token_id=1,
        eos_token_id=2,
    )
    return _finish(LlavaForConditionalGeneration(cfg), "sdpa")


def llava_shaped_inputs(batch: int = 1, seed: int = 0, text: int = 24):
    gen = torch.Generator().manual_seed(seed)
    rows = [_prompt([576], pre=4, post=text - 6, gen=gen, vstart=False) for _ in range(batch)]
    ids, mask = _pad(rows, "left")
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "pixel_values": torch.randn(batch, 3, 336, 336, generator=gen),
    }
