"""Reference computations shared by the runtime tests."""

from __future__ import annotations

import sys

import pytest
import torch

import vtprune

ROW_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids")
# random tiny models may emit any id; special ids (image placeholders...) from 100 on are banned
BANNED = list(range(100, 128))


def image_runs(ids: torch.Tensor, image_id: int = 120) -> list[tuple[int, torch.Tensor]]:
    """(row, positions) of each image: maximal runs of image placeholder tokens (tiny.IMAGE)."""
    runs = []
    for b in range(ids.shape[0]):
        pos = torch.nonzero(ids[b] == image_id).flatten()
        if pos.numel():
            breaks = torch.nonzero(pos[1:] != pos[:-1] + 1).flatten() + 1
            runs += [(b, p) for p in torch.tensor_split(pos, breaks.tolist())]
    return runs


def count_hooks(model) -> int:
    """Forward (pre-)hooks on every module: what ``apply`` adds and ``remove`` must take away."""
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def greedy(model, kw, steps: int, **gen) -> torch.Tensor:
    with torch.no_grad():
        out = model.generate(**kw, max_new_tokens=steps, do_sample=False, suppress_tokens=BANNED, **gen)
    return out[:, kw["input_ids"].shape[1] :]


def uncached_greedy(model, kw, selections, steps: int) -> torch.Tensor:
    """Step the pruned model without a KV cache, replaying the prefill's selection each step."""
    ids = kw["input_ids"]
    extra = {k: v for k, v in kw.items() if k not in ROW_KEYS}
    mtt = kw.get("mm_token_type_ids")
    out = []
    for _ in range(steps):
        call = dict(extra, input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
        if mtt is not None:
            call["mm_token_type_ids"] = torch.cat([mtt, mtt.new_zeros(1, ids.shape[1] - mtt.shape[1])], 1)
        with vtprune.replay(selections), torch.no_grad():
            logits = model(**call).logits[:, -1]
            logits[:, BANNED] = float("-inf")
            nxt = logits.argmax(-1, keepdim=True)
        out.append(nxt)
        ids = torch.cat([ids, nxt], 1)
    return torch.cat(out, 1)


def _slice_media(kw: dict, one: dict, first: int, n: int, pixels: str, grid_key: str) -> None:
    """Media ``first .. first + n - 1`` of one kind (Qwen: patches of ``grid_key`` rows in ``pixels``)."""
    if n == 0:
        return
    grid = kw[grid_key]
    patches = grid.prod(-1)
    start = int(patches[:first].sum())
    one[pixels] = kw[pixels][start : start + int(patches[first : first + n].sum())]
    one[grid_key] = grid[first : first + n]


def row_alone(family: str, kw: dict, b: int, images_per_row: list) -> dict:
    """Row ``b`` of a padded batch as its own unpadded prompt with its own images (and videos:
    Qwen rows given as media strings, as ``tiny.media_inputs`` takes them)."""
    real = kw["attention_mask"][b].bool()
    one = {k: kw[k][b : b + 1, real] for k in ROW_KEYS if k in kw}
    if isinstance(images_per_row[b], str):
        before = "".join(images_per_row[:b])
        mine = images_per_row[b]
        if family == "llava_onevision":  # one pixel_values row per image, one video row per video
            i, v, ni, nv = before.count("i"), before.count("v"), mine.count("i"), mine.count("v")
            if ni:
                one.update(
                    pixel_values=kw["pixel_values"][i : i + ni], image_sizes=kw["image_sizes"][i : i + ni]
                )
            if nv:
                one["pixel_values_videos"] = kw["pixel_values_videos"][v : v + nv]
            return one
        _slice_media(kw, one, before.count("i"), mine.count("i"), "pixel_values", "image_grid_thw")
        _slice_media(kw, one, before.count("v"), mine.count("v"), "pixel_values_videos", "video_grid_thw")
        return one
    first = sum(images_per_row[:b])
    n = images_per_row[b]
    if n == 0:
        return one
    if family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        _slice_media(kw, one, first, n, "pixel_values", "image_grid_thw")
    else:
        one["pixel_values"] = kw["pixel_values"][first : first + n]
        if "image_sizes" in kw:
            one["image_sizes"] = kw["image_sizes"][first : first + n]
    return one


def shared_tables(method: str, fixtures: dict[str, str], plan: dict, keep_all: dict | None = None):
    """The four shared equivalence tests of ``tests/test_equivalence.py`` for one method, on each
    family of ``fixtures`` (family -> name of the module fixture holding its model), for methods
    that run on only some families or need models built their own way (tower stages). Assign the
    returned tuple to module-level ``test_*`` names so pytest collects them there."""
    import test_equivalence as eq  # here: test_equivalence imports this module

    families = pytest.mark.parametrize("family", sorted(fixtures))

    def setup(request, monkeypatch, family):
        monkeypatch.setitem(eq.PLANS, method, plan)
        monkeypatch.setitem(eq.KEEP_ALL, method, keep_all or dict(plan, keep=1.0))
        return family, request.getfixturevalue(fixtures[family])

    @families
    def test_nothing_to_drop_equals_unpruned(request, monkeypatch, family):
        eq.test_keep_everything_equals_unpruned(setup(request, monkeypatch, family), method)

    @families
    def test_remove_restores_the_model(request, monkeypatch, family):
        eq.test_remove_restores_exact_outputs_and_module_tree(setup(request, monkeypatch, family), method)

    @families
    def test_cached_generate_equals_uncached(request, monkeypatch, family):
        eq.test_cached_generate_equals_uncached_pruned_steps(setup(request, monkeypatch, family), method)

    @families
    def test_padded_batch_equals_rows_alone(request, monkeypatch, family):
        eq.test_left_padded_batch_equals_rows_alone(setup(request, monkeypatch, family), method)

    return (
        test_nothing_to_drop_equals_unpruned,
        test_remove_restores_the_model,
        test_cached_generate_equals_uncached,
        test_padded_batch_equals_rows_alone,
    )


def eager_clip_layer(layer, h: torch.Tensor):
    """One CLIP / SigLIP encoder layer on ``h [1, T, D]`` written plainly, with the full softmax
    attention matrix (the reference side of the tower-stage tests): returns the layer's output and
    its per-head ``q``, ``k``, ``v`` ``[1, H, T, d]`` and attention probabilities ``[1, H, T, T]``."""
    attn = layer.self_attn
    x = layer.layer_norm1(h)
    shape = (1, -1, attn.num_heads, attn.head_dim)
    q, k, v = (p(x).view(shape).transpose(1, 2) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    weights = torch.softmax((q * attn.scale) @ k.transpose(-1, -2), dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(1, -1, attn.embed_dim)
    h = h + attn.out_proj(out)
    h = h + layer.mlp(layer.layer_norm2(h))
    return h, q, k, v, weights


def module_inputs(model, kw: dict, module) -> tuple[tuple, dict]:
    """``(args, kwargs)`` that ``module`` receives (its last call) in a run of ``model`` on ``kw``."""
    seen = {}

    def grab(mod, args, kwargs):
        seen["call"] = (args, kwargs)

    handle = module.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**kw)
    finally:
        handle.remove()
    return seen["call"]


def attention_input(model, kw: dict, attn) -> dict:
    """What the attention module ``attn`` receives in a run of ``model`` on ``kw``: ``x`` (its
    hidden states), ``rope`` (rotary tables) and ``cu`` (``cu_seqlens``, or None)."""
    args, kwargs = module_inputs(model, kw, attn)
    return {
        "x": args[0] if args else kwargs["hidden_states"],
        "cu": kwargs.get("cu_seqlens", args[1] if len(args) > 1 else None),
        "rope": kwargs["position_embeddings"],
    }


def qwen_tower_qk(attn, x: torch.Tensor, rope) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries and keys ``[n, heads, d]`` of a Qwen vision block's attention, rotary applied as
    the block does."""
    n = x.shape[0]
    with torch.no_grad():
        q, k, _ = attn.qkv(x).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        return sys.modules[type(attn).__module__].apply_rotary_pos_emb_vision(q, k, *rope)


def unpermute(t: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Rows of ``t`` (row ``i`` belongs at ``perm[i]``) back in their original order."""
    out = torch.empty_like(t)
    out[perm] = t
    return out


def lm_view(model, kw: dict, plan, **options) -> tuple[dict, object]:
    """The language model's inputs of a forward under ``plan`` (``embeds``: ``inputs_embeds``,
    ``positions``: ``position_ids``; the hook runs after vtprune's, so it sees the compacted
    input) and the run's stats."""
    with vtprune.pruned(model, plan, **options):
        kwargs = module_inputs(model, kw, model.model.language_model)[1]
        return {"embeds": kwargs["inputs_embeds"], "positions": kwargs.get("position_ids")}, vtprune.stats(
            model
        )


def unpruned_embeds(model, kw: dict) -> torch.Tensor:
    """The language model's ``inputs_embeds`` in a forward with no plan."""
    return module_inputs(model, kw, model.model.language_model)[1]["inputs_embeds"]


def merger_index(model, kw: dict, method: str, **options) -> tuple[torch.Tensor, object]:
    """Under a Qwen tower stage: the original patch of each slot the merger receives, and the
    run's stats (the spy is registered after the plan's own pre-hook, so it sees the real input)."""
    from vtprune.runtime.tower import TOWER

    seen = []

    def spy(module, args, kwargs):
        seen.append(TOWER.get().index.clone())

    with torch.no_grad(), vtprune.pruned(model, method, **options):
        handle = model.model.visual.merger.register_forward_pre_hook(spy, with_kwargs=True)
        try:
            model(**kw)
        finally:
            handle.remove()
        stats = vtprune.stats(model)
    (index,) = seen
    return index, stats


def llava_encoder_flops(model, kw: dict, method: str, **options) -> tuple[int, int, list]:
    """Counted FLOPs of LLaVA's image encoder (tower + projector) unpruned and under ``method``,
    and the tower tokens per layer the pruned run recorded."""
    from vtprune.flops import count_flops

    def encode():
        with torch.no_grad():
            return model.model.get_image_features(
                pixel_values=kw["pixel_values"],
                vision_feature_layer=-2,
                vision_feature_select_strategy="default",
            )

    full, _ = count_flops(encode)
    with vtprune.pruned(model, method, **options):
        model(**kw)
        tower = vtprune.stats(model).tower_tokens_per_layer
        pruned, _ = count_flops(encode)
    return full, pruned, tower
