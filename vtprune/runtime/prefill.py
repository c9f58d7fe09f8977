"""Prefill-time work of the runtime: running vision and prefill stages and compacting the sequence.

Every stage returns the visual slots it keeps; the runtime drops the rest physically (gathers
hidden states, positions, rotary tables, masks) so later layers compute over fewer tokens.
Each new token set gets its own causal mask and rotary tables, built once per request.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from vtprune import compat
from vtprune.stages import LMInput, PrefillContext, PrefillStage, TowerStage, VisionContext

from .plumbing import keep_mask, on_slots, replayed_keep, slots_within
from .state import REPLAY, RequestState
from .survivors import survivor_layouts
from .tokens import TokenSet, compact, gather_many, gather_seq


def select(state: RequestState, stage, token_set: TokenSet, compute, on_replay=None) -> torch.Tensor:
    """A stage's kept visual slots: computed, or replayed from an earlier selection (then handed
    to ``on_replay``, e.g. to redo a vision stage's recycling merges)."""
    replay = REPLAY.get()
    # vision stages depend only on the images, so they recompute (and redo their merges);
    # prefill stages, and vision stages that read the prompt, depend on the prompt, whose growth
    # replay must not see
    if replay is not None and stage.key in replay and stage.reads_prompt:
        keep_vis = replayed_keep(replay[stage.key], token_set, state.orig_len)
        if on_replay is not None:
            on_replay(keep_vis)
    else:
        keep_vis = compute()
    keep_vis = keep_vis.to(token_set.visual.device) & token_set.visual
    # the last real token of a row produces the next-token logits: a prompt that ends with an
    # image would otherwise lose its query (zero logits, a silently wrong answer)
    keep_vis = keep_vis | (token_set.visual & token_set.last_real())
    state.record_selection(stage.key, token_set, keep_vis)
    return keep_vis


def run_vision_stages(state: RequestState, stages, adapter, base: TokenSet, embeds, kwargs) -> None:
    """Keep the visual tokens every vision stage keeps; compact the LM input once."""
    ctx = VisionContext(
        embeds=embeds,
        visual=base.visual,
        layouts=state.layouts,
        project=adapter.tower_projector(),
        adapter=adapter,
        input_ids=state.input_ids,
        valid=base.valid,
    )
    keep_vis = base.visual.clone()
    # vision stages after a tower stage choose among the tower's survivors (their lists are shared)
    towered = any(isinstance(s, TowerStage) for s in stages)
    survivors = (
        dataclasses.replace(ctx, layouts=survivor_layouts(state.layouts, adapter.patches_per_token))
        if towered
        else ctx
    )
    for stage in stages:
        here = ctx if isinstance(stage, TowerStage) else survivors
        redo = (
            functools.partial(replay_recycling, state, stage, here, base) if stage.recycle != "none" else None
        )
        kept = select(state, stage, base, functools.partial(stage.select, here), redo)
        if isinstance(stage, TowerStage):  # what later vision stages' keep is relative to
            state.visual_tower = kept.sum(1)
        keep_vis &= kept
        record_centres(state, stage, here, base)
    keep = keep_mask(base, keep_vis)
    if ctx.protected:
        table = torch.zeros_like(base.visual)
        for row, positions in ctx.protected:
            table[row, positions.to(table.device)] = True
        state.protected = table
    if ctx.replacements:
        embeds = embeds.clone()
        for row, pos, vec in ctx.replacements:
            embeds[row, pos] = vec.to(embeds.dtype)
        kwargs["inputs_embeds"] = embeds
    if keep is None:
        return
    slots, present = compact(keep)
    new = base.select(slots, present, 0)
    # the compacted sequence is the language model's input from here on
    new.lm_index = torch.arange(new.length, device=embeds.device).expand_as(new.lm_index)
    state.sets = [new]
    pos = kwargs.get("position_ids")
    if pos is None:
        pos = adapter.prefill_position_ids(embeds)
    kwargs["position_ids"] = gather_seq(pos, slots, dim=pos.dim() - 1)
    kwargs["attention_mask"] = new.valid.long()
    kwargs["inputs_embeds"] = gather_seq(embeds, slots, present)


def record_centres(state: RequestState, stage, ctx: VisionContext, base: TokenSet) -> None:
    """Remember the cluster centres a vision stage added (``recycle="clusters"``) under
    ``KEY:centres`` (original positions per row), so a replay can tell them from the pick."""
    added = ctx.centres.pop(stage.key, None)
    if not added:
        return
    rows = [torch.zeros(0, dtype=torch.long)] * base.orig_index.shape[0]
    for row, positions in added:
        found = base.orig_index[row][positions.to(base.orig_index.device)].cpu()
        rows[row] = torch.cat([rows[row], found]).sort().values
    state.selections[f"{stage.key}:centres"] = rows
    keep_kept_set_last(state, stage.key)


def keep_kept_set_last(state: RequestState, key: str) -> None:
    """Move a stage's kept set behind the merge records it just added: readers of
    ``stats.selections`` take the last entry as the final kept set."""
    state.selections[key] = state.selections.pop(key)


def replay_recycling(
    state: RequestState, stage, ctx: VisionContext, base: TokenSet, keep: torch.Tensor
) -> None:
    """Redo a replayed vision stage's recycling (its recorded cluster centres, if any, included)."""
    rows = REPLAY.get().get(f"{stage.key}:centres")
    centres = None if rows is None else replayed_keep(rows, base, state.orig_len)
    stage.recycle_replayed(ctx, keep, centres)


def prefill_layer(state: RequestState, stages, adapter, i: int, args, kwargs, keep_input: bool = False):
    """Decoder-layer pre-hook at prefill: run the stages placed here, then hand the layer the
    mask, rotary tables and (absent) position ids of the token set it really holds.

    ``keep_input``: remember layer 0's input (the LM input embeddings) for stages that read it."""
    hidden = args[0] if args else kwargs.pop("hidden_states")
    if keep_input and i == 0:
        state.step.memo["lm_input"] = (hidden, len(state.sets) - 1)
    if state.step.lm_rotary is None:
        state.step.lm_rotary = kwargs["position_embeddings"]
    for stage in stages:
        with state.timed():
            hidden = run_prefill_stage(state, stage, adapter, i, hidden, kwargs)
    s = state.layer_set[i]
    if s == 0:
        return (hidden,) + tuple(args[1:]), kwargs
    kwargs["attention_mask"] = state.step.masks[s]
    kwargs["position_embeddings"] = state.step.rotary[s]
    kwargs["position_ids"] = None  # gapped ids would read as packed sequences
    return (hidden,) + tuple(args[1:]), kwargs


def rotary_for(state: RequestState, s: int):
    """Rotary (cos, sin) of token set ``s``: the LM's tables gathered at its LM positions, cached."""
    if s == 0:
        return state.step.lm_rotary
    if s not in state.step.rotary:
        cos, sin = state.step.lm_rotary
        idx = state.sets[s].lm_index
        state.step.rotary[s] = tuple(gather_many([cos, sin], idx))
    return state.step.rotary[s]


def run_prefill_stage(state: RequestState, stage: PrefillStage, adapter, i: int, hidden, kwargs):
    """Score and drop visual tokens before layer ``i``; returns the (possibly shorter) hidden states."""
    s_cur = len(state.sets) - 1
    cur = state.sets[s_cur].to(hidden.device)
    cos, sin = rotary_for(state, s_cur)
    answer = None
    if state.answer_query is not None:
        answer = state.answer_query.to(hidden.device).gather(1, cur.orig_index.clamp(min=0)) & cur.present
    ctx = PrefillContext(
        layer=i,
        hidden=hidden,
        visual=cur.visual,
        valid=cur.valid,
        query_slot=cur.query_slot(),
        visual_in=state.sets[0].visual_counts().to(hidden.device),
        layers=adapter.layers,
        cos=cos,
        sin=sin,
        previous_qk=state.step.captured_qk,
        previous_v=state.step.memo.get("previous_v"),
        answer_query=answer,
        protected=on_slots(state.protected, cur),
        visual_prompt=state.visual_in.to(hidden.device),
        visual_tower=None if state.visual_tower is None else state.visual_tower.to(hidden.device),
        lm_input=lm_input(state, cur) if stage.needs_lm_input else None,
        final_norm=getattr(adapter.language_model, "norm", None),
        orig_index=cur.orig_index,
        tapped=None if stage.tap is None else state.step.memo.get(("tap", stage.tap.key), {}),
    )
    keep_vis = select(state, stage, cur, lambda: stage.select(ctx))
    hidden = apply_merges(state, stage, cur, ctx, hidden)
    keep = keep_mask(cur, keep_vis)
    if keep is None:
        return hidden
    slots, present = compact(keep)
    new = cur.select(slots, present, i)
    hidden = gather_seq(hidden, slots, present)
    state.sets.append(new)
    s_new = len(state.sets) - 1
    state.layer_set[i:] = [s_new] * (len(state.layer_set) - i)
    rotary_for(state, s_new)
    state.step.masks[s_new] = compat.causal_mask(
        adapter.text_config, hidden, new.valid.long(), compat.get_cache(kwargs), layer_idx=i
    )
    state.step.captured_qk = None
    state.step.memo.pop("previous_v", None)
    return hidden


def lm_input(state: RequestState, cur: TokenSet) -> LMInput:
    """Layer 0's input and its token set, with each current slot's slot there."""
    embeds, s0 = state.step.memo["lm_input"]
    first = state.sets[s0].to(embeds.device)
    return LMInput(embeds, first.visual, first.valid, slots_within(first, cur))


def apply_merges(state: RequestState, stage, cur: TokenSet, ctx: PrefillContext, hidden):
    """Give merge centres the mean hidden state of their members (``ctx.merge``).

    The groups are recorded in original positions under ``KEY:members`` / ``KEY:centres`` (one
    centre per member), so an uncached replay of a longer prompt merges the same tokens.
    """
    replay = REPLAY.get()
    mkey, ckey = f"{stage.key}:members", f"{stage.key}:centres"
    if replay is not None and mkey in replay:
        groups = []
        pos = torch.where(cur.present, cur.orig_index, state.orig_len)
        for b, (members, centres) in enumerate(zip(replay[mkey], replay[ckey])):
            if members.numel():
                table = torch.full((state.orig_len + 1,), -1, dtype=torch.long, device=pos.device)
                table[pos[b]] = torch.arange(cur.length, device=pos.device)
                groups.append((b, table[members.to(pos.device)], table[centres.to(pos.device)]))
    else:
        groups = ctx.merges
        orig = cur.orig_index
        mem_rows = [torch.zeros(0, dtype=torch.long)] * orig.shape[0]
        cen_rows = list(mem_rows)
        for b, members, centres in groups:
            mem_rows[b] = orig[b][members].cpu()
            cen_rows[b] = orig[b][centres].cpu()
        if groups:
            state.selections[mkey], state.selections[ckey] = mem_rows, cen_rows
            keep_kept_set_last(state, stage.key)
    if not groups:
        return hidden
    hidden = hidden.clone()
    for b, members, centres in groups:
        uniq, inverse = torch.unique(centres, return_inverse=True)
        sums = torch.zeros(uniq.numel(), hidden.shape[-1], dtype=torch.float32, device=hidden.device)
        sums.index_add_(0, inverse, hidden[b, members].float())
        counts = torch.bincount(inverse, minlength=uniq.numel()).unsqueeze(1)
        hidden[b, uniq] = (sums / counts).to(hidden.dtype)
    return hidden
