"""Tower stages: dropping patch tokens between vision-tower layers (CLIP towers: LLaVA-1.5).

While an image encoder call runs (``EncoderTap`` opens a :class:`TowerCall`), forward hooks on
the q/k/v projections of the layers a stage reads keep the CLS query row, the keys and the
values the tower computes anyway; a pre-hook on the next layer turns them into the CLS
attention row (one query, O(heads * tokens * head_dim): the tower keeps SDPA) and asks the
stages which slots survive. The survivors are gathered physically (hidden states; CLIP adds
its position embeddings before the layers, so nothing else carries a sequence axis), so every
later layer runs on fewer tokens.

Rows of the tower batch (images) may keep different counts: the shorter rows are padded and
an additive key mask is handed to every later layer, so an image's selection does not depend
on the other images of the batch (the official FlowCut uses the batch's maximum drop count).

After the call, :meth:`TowerCall.finish` puts each image's projected features back at their
original placeholder slots (zeros elsewhere), so the model's own feature scatter still sees one
feature per placeholder, and records the survivors (``vision["tower_kept"]``, local token
indices) and the tokens per tower layer; the tower stage's ``select`` then drops the other
placeholders at the language model's input, with the compaction a vision stage gets.

Reading the survivors' count sizes the next layer's input: one host read per pruning layer.
"""

from __future__ import annotations

import contextvars

import torch

from vtprune.stages import TowerContext

TOWER: contextvars.ContextVar[TowerCall | None] = contextvars.ContextVar("vtprune_tower_call", default=None)


class TowerCall:
    """The state of one encoder call: where each slot came from and what the stages remember."""

    def __init__(self, run: TowerRun):
        self.run = run
        self.index: torch.Tensor | None = None  # [B, T] original tower token per slot
        self.valid: torch.Tensor | None = None  # [B, T] real slots
        self.mask: torch.Tensor | None = None  # additive key mask once rows differ in length
        self.counts: list[torch.Tensor] = []  # per tower layer: valid slots per row at its input
        self.captured: dict[int, dict] = {}
        self.scratch = {stage.key: {} for stage in run.stages}
        # per tower layer: (index, valid) at its input, to put a probe's captures back in place
        self.slots: list[tuple[torch.Tensor, torch.Tensor]] = []

    def compact(self, hidden: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Gather the kept slots of every row to the front; pad rows to the longest."""
        keep = keep & self.valid
        n = keep.sum(1)
        width = int(n.max())
        order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :width]
        hidden = hidden.gather(1, order.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        self.index = self.index.gather(1, order)
        self.valid = torch.arange(width, device=n.device).unsqueeze(0) < n.unsqueeze(1)
        if bool(self.valid.all()):
            self.mask = None
        else:
            mask = torch.zeros(self.valid.shape, dtype=hidden.dtype, device=hidden.device)
            self.mask = mask.masked_fill(~self.valid, torch.finfo(hidden.dtype).min)[:, None, None, :]
        return hidden

    def cls_row(self, layer: int) -> tuple[torch.Tensor, ...]:
        """``(probs [B, H, T], values, queries, keys)`` of ``layer``: the CLS query's softmax over
        the valid keys, from the projections the layer computed, and the per-head values, queries
        (every row where a stage needs them, else the CLS row) and keys ``[B, H, T or 1, d]``."""
        slot = self.captured.pop(layer)
        attn = slot["attn"]
        b, t, _ = slot["k"].shape
        h = attn.num_heads
        q = slot["q"].float().view(b, -1, h, attn.head_dim).transpose(1, 2)
        k = slot["k"].float().view(b, t, h, -1).transpose(1, 2)
        v = slot["v"].float().view(b, t, h, -1).transpose(1, 2)
        if self.run.has_cls:
            row = q[:, :, :1]
        else:  # no CLS (SigLIP): the mean query of the row's patches, FlowCut's "global" row
            w = self.valid[:, None, :, None].to(q.dtype)
            row = (q * w).sum(2, keepdim=True) / w.sum(2, keepdim=True)
        logits = (row @ k.transpose(-1, -2))[:, :, 0] * attn.scale  # [B, H, T]
        logits = logits.masked_fill(~self.valid[:, None, :], float("-inf"))
        return torch.softmax(logits, dim=-1), v, q, k

    def expand(self, finished: dict) -> dict:
        """A probe's per-layer captures (vision stages composed with this tower stage) back at the
        original tower slots: zeros where the token had left, CLS probabilities renormalised over
        the slots really present (padding of shorter rows is masked here, not by the probe)."""
        for layer, tensors in finished.items():
            index, valid = self.slots[layer]
            for name, t in list(tensors.items()):
                axis = 2 if name == "cls_heads" else 1
                if t.shape[axis] != index.shape[1]:
                    continue
                full = t.new_zeros(*t.shape[:axis], self.slots[0][0].shape[1], *t.shape[axis + 1 :])
                for b in range(t.shape[0]):
                    src = t[b].movedim(axis - 1, 0)[valid[b]]
                    full[b].movedim(axis - 1, 0)[index[b][valid[b]]] = src
                tensors[name] = full
            if "cls_heads" in tensors:
                heads = tensors["cls_heads"]
                heads = heads / heads.sum(-1, keepdim=True).clamp_min(1e-30)
                tensors["cls_heads"], tensors["cls"] = heads, heads.sum(1)
        return finished

    def finish(self, feats: list[torch.Tensor], specs: list) -> tuple[list[torch.Tensor], list[dict]]:
        """Each image's features at its original placeholder slots, and what the tower kept."""
        counts = torch.stack(self.counts, 1).tolist()  # [B, tower layers]
        index, valid = self.index.tolist(), self.valid.tolist()
        full, vision = [], []
        for b, (f, spec) in enumerate(zip(feats, specs)):
            lead = len(index[b]) - f.shape[0]  # tower slots with no feature row (CLS dropped)
            inverse = {int(s): i for i, s in enumerate(spec.source.tolist())}
            rows = [j for j in range(f.shape[0]) if valid[b][j + lead]]
            local = torch.tensor([inverse[index[b][j + lead]] for j in rows], dtype=torch.long)
            out = f.new_zeros(spec.num_tokens, f.shape[-1])
            out[local.to(f.device)] = f[torch.tensor(rows, dtype=torch.long, device=f.device)]
            full.append(out)
            vision.append({"tower_kept": local, "tower_tokens": counts[b]})
        return full, vision


class TowerRun:
    """The hooks of the tower stages of one plan (one model)."""

    def __init__(self, adapter, stages: list):
        self.adapter, self.stages = adapter, stages
        self.depth = adapter.vision_layers_count
        self.feature_layer = adapter.vision_feature_layer()
        self.after: dict[int, list] = {}
        for stage in stages:
            for layer in stage.tower_layers(self.feature_layer, self.depth):
                self.after.setdefault(layer, []).append(stage)
        self.has_cls = adapter.has_cls
        self.patches = adapter.tower_tokens_per_crop - int(self.has_cls)
        # only a stage that reads whole attention maps, or a tower without CLS (the mean query
        # of every row), keeps every query row (else the CLS row)
        self.all_queries = any(s.needs_queries for s in stages) or not self.has_cls
        self.cls_in_lm = self.has_cls and adapter.config.vision_feature_select_strategy != "default"

    def new_call(self) -> TowerCall:
        return TowerCall(self)

    def install(self, handles: list) -> None:
        """Register the hooks into ``handles`` (as they go: a failure leaves none behind)."""
        for layer in self.after:
            attn = self.adapter.vision_attention(layer)
            for what in ("q", "k", "v"):
                proj = getattr(attn, f"{what}_proj")
                handles.append(proj.register_forward_hook(self._keep(layer, what, attn)))
        for i in range(self.depth):
            block = self.adapter.vision_block(i)
            handles.append(block.register_forward_pre_hook(self._before(i), with_kwargs=True))

    def _keep(self, layer: int, what: str, attn):
        def hook(module, args, output):
            call = TOWER.get()
            if call is not None and call.run is self:
                slot = call.captured.setdefault(layer, {"attn": attn})
                rows = what == "q" and not self.all_queries
                slot[what] = (output[:, :1] if rows else output).detach()

        return hook

    def _before(self, i: int):
        def hook(module, args, kwargs):
            call = TOWER.get()
            if call is None or call.run is not self:
                return None
            hidden = args[0] if args else kwargs.pop("hidden_states")
            rest = tuple(args[1:])
            if i == 0:
                b, t, _ = hidden.shape
                if (rest and rest[0] is not None) or kwargs.get("attention_mask") is not None:
                    raise NotImplementedError(
                        "vtprune: tower stages need a vision tower called without an attention mask"
                    )
                call.index = torch.arange(t, device=hidden.device).expand(b, t)
                call.valid = torch.ones(b, t, dtype=torch.bool, device=hidden.device)
            elif i - 1 in self.after:
                hidden = self._run_stages(call, i - 1, hidden)
            call.counts.append(call.valid.sum(1))
            call.slots.append((call.index, call.valid))
            if rest:
                rest = (call.mask,) + rest[1:]
            else:
                kwargs["attention_mask"] = call.mask
            return (hidden,) + rest, kwargs

        return hook

    def context_extras(self, call: TowerCall) -> dict:
        """Family-specific :class:`TowerContext` fields (none for whole-image rows)."""
        return {}

    def _run_stages(self, call: TowerCall, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        # one tower stage per plan (the runtime refuses more), so the row read here is its own
        (stage,) = self.after[layer]
        probs, values, queries, keys = call.cls_row(layer)
        wants = stage.needs_queries
        ctx = TowerContext(
            layer=layer,
            hidden=hidden,
            valid=call.valid,
            index=call.index,
            cls_probs=probs,
            values=values,
            feature_layer=self.feature_layer,
            patches=self.patches,
            cls_in_lm=self.cls_in_lm,
            scratch=call.scratch[stage.key],
            has_cls=self.has_cls,
            queries=queries if wants else None,
            keys=keys if wants else None,
            scale=float(self.adapter.vision_attention(layer).scale),
            **self.context_extras(call),
        )
        keep = stage.after_layer(ctx)
        if keep is None:
            return hidden
        keep = keep & call.valid
        if self.has_cls:
            keep[:, 0] = True  # CLS stays: later layers and the projector read it
        if bool((keep == call.valid).all()):
            return hidden
        return call.compact(hidden, keep)
