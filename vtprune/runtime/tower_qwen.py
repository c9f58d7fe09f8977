"""Tower stages on Qwen2-VL's vision tower: whole 2x2 merge groups leave between blocks.

The tower runs every image (and video frame) as one attention sequence of a flat patch list
(``cu_seqlens`` marks the sequences), with rotary tables per patch; four consecutive patches
form one merge group, which the merger turns into one language-model token. A pre-hook on each
block (and on the merger, for a drop after the last block) gathers the kept patches' hidden
states and rotary tables and rebuilds ``cu_seqlens``, which the tower would otherwise hand every
block unchanged. Stages see the sequences padded into rows and may only keep or drop whole
groups, so the merger still merges the right 2x2 patches (the official FlowCut port prunes
single patches before the merger, which then merges unrelated ones).

A video is one attention sequence per temporal patch (a tubelet of ``temporal_patch_size``
frames is one patch in the tower, so a merge group is four patches of one tubelet, a 2x2
spatial block). Each image or video gets one budget, its stage's ``crop_budget`` of its
language-model tokens, split over its sequences by the merge groups each holds (cumulative
rounding, so a video keeps ``round(keep * tokens)`` as an image does, not a rounding per
tubelet); a sequence keeps at least one group, so none empties. The runner reads the call's
media specs for this (``needs_specs``) and hands each row its share as ``row_target``.

There is no CLS token: the row a stage reads is the "global" one, the mean query of the
sequence's patches (rotary applied as the tower does) against its keys, computed beside SDPA from
the block's own ``qkv`` output. After the tower a forward hook puts the merged features back at
their original token slots (zeros elsewhere) so the model's own split and scatter still match;
the survivors then leave at the language model's input like a vision stage's picks.
"""

from __future__ import annotations

import itertools
import sys

import torch
import torch.nn.functional as F

from vtprune.stages import TowerContext

from .tower import TOWER


class QwenTowerCall:
    def __init__(self, run: QwenTowerRun):
        self.run = run
        self.index: torch.Tensor | None = None  # [N] original flat patch per present patch
        self.lens: list[int] = []  # patches per attention sequence now
        self.orig_lens: list[int] = []
        self.rotary: tuple | None = None
        self.cu: torch.Tensor | None = None
        self.counts: list[list[int]] = []  # per block: patches per sequence at its input
        self.captured: dict[int, torch.Tensor] = {}
        self.kept_units: torch.Tensor | None = None
        self.scratch = {stage.key: {} for stage in run.stages}
        self.slots: list[torch.Tensor] = []  # per block: the original patch of each present patch
        self.specs: list | None = None  # the call's media specs (set by the encoder tap)
        self.targets: torch.Tensor | None = None  # [sequences] patches each sequence keeps

    def plan(self, stage, device) -> torch.Tensor:
        """Per attention sequence: its share of its medium's budget, in patches (whole groups)."""
        g = self.run.group
        units = [n // g for n in self.orig_lens]
        if self.specs is None or sum(spec.frames for spec in self.specs) != len(units):
            raise RuntimeError(
                f"vtprune: the tower ran {len(units)} attention sequences but the media specs "
                f"describe {None if self.specs is None else sum(s.frames for s in self.specs)}"
            )
        targets, s = [], 0
        for spec in self.specs:
            mine = units[s : s + spec.frames]
            total = sum(mine)
            budget = stage.crop_budget(spec.num_tokens, total)
            ends = [(2 * budget * c + total) // (2 * total) for c in itertools.accumulate(mine)]
            targets += [g * max(1, b - a) for a, b in zip([0] + ends[:-1], ends)]
            s += spec.frames
        return torch.tensor(targets, device=device)

    def rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(slot [B, P], valid [B, P])``: the flat position of each sequence's patches, padded."""
        dev = self.index.device
        lens = torch.tensor(self.lens, device=dev)
        starts = F.pad(lens.cumsum(0), (1, 0))[:-1]
        steps = torch.arange(max(self.lens), device=dev)
        valid = steps < lens[:, None]
        return (starts[:, None] + steps).clamp_max(self.index.numel() - 1), valid

    def expand(self, finished: dict) -> dict:
        """A probe's per-block captures (one row per present patch) back at the original patch
        rows, zeros where the patch had left (vision stages composed with this tower stage)."""
        for layer, tensors in finished.items():
            index = self.slots[layer]
            for name, t in list(tensors.items()):
                if t.shape[0] == index.numel():
                    full = t.new_zeros(self.slots[0].numel(), *t.shape[1:])
                    full[index.to(t.device)] = t
                    tensors[name] = full
        return finished

    def finish(self, feats: list[torch.Tensor], specs: list) -> tuple[list[torch.Tensor], list[dict]]:
        """What each image (or video) kept: its local token indices, and its tokens per block."""
        kept = self.kept_units.tolist()
        per_seq = torch.tensor(self.counts).T.tolist()  # [sequences, blocks]
        vision, unit, seq = [], 0, 0
        for spec in specs:
            mine = [u - unit for u in kept if unit <= u < unit + spec.num_tokens]
            frames = spec.frames if spec.kind == "video" else 1
            counts = [sum(c) for c in zip(*per_seq[seq : seq + frames])]
            vision.append({"tower_kept": torch.tensor(mine, dtype=torch.long), "tower_tokens": counts})
            unit, seq = unit + spec.num_tokens, seq + frames
        return feats, vision


class QwenTowerRun:
    needs_specs = True  # the encoder tap hands each call its media specs before the tower runs

    def __init__(self, adapter, stages: list):
        self.adapter, self.stages = adapter, stages
        self.depth = adapter.vision_layers_count
        self.group = adapter.patches_per_token
        # pruning may act after the last block (before the merger), as the official port does
        self.feature_layer = self.depth
        self.after: dict[int, list] = {}
        for stage in stages:
            for layer in stage.tower_layers(self.feature_layer, self.depth):
                self.after.setdefault(layer, []).append(stage)

    def new_call(self) -> QwenTowerCall:
        return QwenTowerCall(self)

    def install(self, handles: list) -> None:
        """Register the hooks into ``handles`` (as they go: a failure leaves none behind)."""
        visual = self.adapter.vision_tower
        for layer in self.after:
            qkv = self.adapter.vision_attention(layer).qkv
            handles.append(qkv.register_forward_hook(self._keep(layer)))
        for i, block in enumerate(visual.blocks):
            handles.append(block.register_forward_pre_hook(self._before(i), with_kwargs=True))
        handles.append(visual.merger.register_forward_pre_hook(self._before(self.depth), with_kwargs=True))
        handles.append(visual.register_forward_hook(self._scatter))

    def _mine(self):
        call = TOWER.get()
        return call if call is not None and call.run is self else None

    def _keep(self, layer: int):
        def hook(module, args, output):
            call = self._mine()
            if call is not None:
                call.captured[layer] = output.detach()

        return hook

    def _before(self, i: int):
        def hook(module, args, kwargs):
            call = self._mine()
            if call is None:
                return None
            hidden = args[0] if args else kwargs.pop("hidden_states")
            if i == 0:
                call.cu = kwargs["cu_seqlens"]
                call.lens = call.orig_lens = call.cu.diff().tolist()
                call.index = torch.arange(hidden.shape[0], device=hidden.device)
                call.rotary = kwargs["position_embeddings"]
            elif i - 1 in self.after:
                hidden = self._run_stage(call, i - 1, hidden)
            if i < self.depth:
                call.counts.append(list(call.lens))
                call.slots.append(call.index)
                kwargs["cu_seqlens"], kwargs["position_embeddings"] = call.cu, call.rotary
                if "max_seqlen" in kwargs:
                    m = max(call.lens)
                    kwargs["max_seqlen"] = torch.tensor(m) if torch.is_tensor(kwargs["max_seqlen"]) else m
            return (hidden,) + tuple(args[1:]), kwargs

        return hook

    def _scatter(self, module, args, output):
        call = self._mine()
        if call is None or call.index is None:
            return None
        merged = output.pooler_output
        units = call.index[:: self.group] // self.group
        full = merged.new_zeros(sum(call.orig_lens) // self.group, merged.shape[-1])
        full[units] = merged
        output.pooler_output = full
        call.kept_units = units.cpu()
        return output

    def _run_stage(self, call: QwenTowerCall, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        (stage,) = self.after[layer]
        attn = self.adapter.vision_attention(layer)
        qkv = call.captured.pop(layer)
        n = qkv.shape[0]
        q, k, v = qkv.reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb_vision
        q, k = rope(q, k, *call.rotary)
        slot, valid = call.rows()
        qp, kp, vp = (x.float()[slot].transpose(1, 2) for x in (q, k, v))  # [B, H, P, d]
        w = valid[:, None, :, None].float()
        mean_q = (qp * w).sum(2, keepdim=True) / w.sum(2, keepdim=True)
        logits = (mean_q @ kp.transpose(-1, -2))[:, :, 0] * attn.scaling
        probs = torch.softmax(logits.masked_fill(~valid[:, None], float("-inf")), dim=-1)
        starts = torch.tensor([0] + call.orig_lens[:-1], device=slot.device).cumsum(0)
        if call.targets is None:
            call.targets = call.plan(stage, slot.device)
        ctx = TowerContext(
            layer=layer,
            hidden=hidden,
            valid=valid,
            index=torch.where(valid, call.index[slot] - starts[:, None], 0),
            cls_probs=probs,
            values=vp,
            feature_layer=self.feature_layer,
            patches=max(call.orig_lens),
            scratch=call.scratch[stage.key],
            has_cls=False,
            group=self.group,
            row_patches=torch.tensor(call.orig_lens, device=slot.device),
            queries=qp if stage.needs_queries else None,
            keys=kp if stage.needs_queries else None,
            scale=float(attn.scaling),
            row_target=call.targets,
        )
        keep = stage.after_layer(ctx)
        if keep is None:
            return hidden
        keep = keep & valid
        if bool((keep == valid).all()):
            return hidden
        chosen = slot[keep]  # row-major: sequences stay in order, patches in their order
        call.lens = keep.sum(1).tolist()
        call.cu = F.pad(torch.tensor(call.lens, device=call.cu.device).cumsum(0), (1, 0)).to(call.cu.dtype)
        call.index = call.index[chosen]
        call.rotary = tuple(t[chosen] for t in call.rotary)
        return hidden[chosen]
