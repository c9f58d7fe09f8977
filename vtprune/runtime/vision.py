"""Vision-tower scores read beside the tower's own attention (rule 5: no eager switch).

Vision-stage methods (HiRED, VisionZip, MustDrop's key set) need the attention of the CLS
query onto the patch keys at chosen tower layers, and sometimes the keys themselves. A probe
puts forward hooks on the q/k projections of exactly those layers and, only while an encoder
call is being captured, keeps the CLS query row and the keys the tower computes anyway; the
probabilities are O(heads * tokens * head_dim) extra work per crop.

LLaVA-OneVision's SigLIP tower has no CLS token either; it runs one crop (or video frame) per
batch row, so its substitute is the attention each patch receives from all patches of its crop.

Qwen2-VL's tower has no CLS token. Its documented substitute is the mean attention each patch
*receives* from all patches of its image in the chosen block (rotary applied as the tower
does), averaged over the 2x2 patches merged into one language-model token. Qwen2.5-VL's blocks
run on a window-permuted patch order: the probe records the permutation when the tower starts
and maps every capture (scores, keys, hidden states) back to the token order in ``finish``.

A stage with ``score="wpr"`` (towers without CLS) also gets ``wpr``: weighted PageRank
(``vtprune.attention_graph``) on the head-mean map the received attention is the column mean
of, per image (crop, frame); no other map is built.

Captures are detached: they feed selections (scores, similarities), which are not differentiated.
"""

from __future__ import annotations

import contextvars
import sys

import torch

from vtprune.attention_graph import weighted_pagerank

from .tower import TOWER

CAPTURE: contextvars.ContextVar[dict | None] = contextvars.ContextVar("vtprune_vision_capture", default=None)


class _Probe:
    def __init__(
        self,
        adapter,
        layers: list[int],
        keys: bool,
        hidden_layers: list[int] = (),
        wpr: bool = False,
        hub: dict | None = None,
    ):
        self.adapter, self.layers, self.keys, self.hidden_layers = adapter, layers, keys, list(hidden_layers)
        #: also keep Zero-TPrune's weighted PageRank of each image's head-mean map (CLS-free towers)
        self.wpr = wpr
        #: tower layer -> hub threshold: also keep each token's attention from the hub tokens (VFlowOpt)
        self.hub = dict(hub or {})

    def install_hidden(self, handles: list) -> None:
        """Forward hooks keeping the output of chosen tower layers (features, e.g. MustDrop's)."""

        def keep(layer):
            def hook(module, args, output):
                capture = CAPTURE.get()
                if capture is not None:
                    out = output[0] if isinstance(output, tuple) else output
                    capture.setdefault(("hidden", layer), out.detach())

            return hook

        for layer in self.hidden_layers:
            handles.append(self.adapter.vision_block(layer).register_forward_hook(keep(layer)))

    @staticmethod
    def split_hidden(raw: dict) -> dict:
        return {key[1]: {"hidden": raw.pop(key)} for key in [k for k in raw if isinstance(k, tuple)]}


class ClsProbe(_Probe):
    """CLS-attention probe for CLIP-style towers (LLaVA, LLaVA-NeXT)."""

    rows: int | None = 1  # query rows kept per crop (the CLS row)

    def install(self, handles: list) -> None:
        """Register the probe's hooks into ``handles`` (as they go: a failure leaves none behind)."""
        self.install_hidden(handles)
        for layer in self.layers:
            attn = self.adapter.vision_attention(layer)
            handles.append(attn.q_proj.register_forward_hook(self._keep(layer, "q", attn)))
            handles.append(attn.k_proj.register_forward_hook(self._keep(layer, "k", attn)))

    def _keep(self, layer: int, what: str, attn):
        rows = None if layer in self.hub else self.rows  # hub scores need every query row

        def hook(module, args, output):
            capture = CAPTURE.get()
            if capture is not None:
                slot = capture.setdefault(layer, {"attn": attn, "wpr": self.wpr})
                slot[what] = (output[:, :rows] if what == "q" else output).detach()
                if layer in self.hub:
                    slot["hub_t"] = self.hub[layer]
                call = TOWER.get()
                if call is not None and getattr(call, "valid", None) is not None:
                    # after a tower stage's drop, shorter rows are padded: maps over whole crops
                    # (received attention, PageRank, hub rows) must skip the padding slots
                    slot["valid"] = call.valid

        return hook

    @classmethod
    def finish(cls, raw: dict) -> dict:
        """Per layer: ``cls`` ``[crops, tokens]`` (CLS attention summed over heads, softmax over
        all keys including CLS), ``cls_heads`` per head, ``keys`` ``[crops, tokens, head_dim]``
        (mean over heads) and, for hidden layers, ``hidden`` (the layer's output)."""
        hidden = cls.split_hidden(raw)
        out = {}
        for layer, slot in raw.items():
            attn, q, k = slot["attn"], slot["q"], slot["k"]
            n, t, _ = k.shape
            h = attn.num_heads
            qh = q[:, :1].float().view(n, 1, h, -1).transpose(1, 2)  # [n, H, 1, d]
            kh = k.float().view(n, t, h, -1).transpose(1, 2)  # [n, H, T, d]
            probs = torch.softmax(qh @ kh.transpose(-1, -2) * attn.scale, dim=-1)[:, :, 0]  # [n, H, T]
            out[layer] = {"cls": probs.sum(1), "cls_heads": probs, "keys": kh.mean(1)}
            if "hub_t" in slot:
                out[layer]["hub"] = _hub_rows(q, kh, attn, attn.scale, slot["hub_t"], slot.get("valid"))
        return _merge_layers(out, hidden)


class CropReceivedProbe(ClsProbe):
    """Mean attention received per patch, per crop, for towers without CLS that run one crop
    (or frame) per batch row with plain attention (SigLIP in LLaVA-OneVision)."""

    rows = None  # every query row

    @classmethod
    def finish(cls, raw: dict) -> dict:
        """Per layer: ``received`` ``[crops, tokens]`` (attention each patch receives, averaged over
        the heads and all queries of its crop), ``keys`` ``[crops, tokens, head_dim]`` (mean over
        heads) and, for hidden layers, ``hidden``."""
        hidden = cls.split_hidden(raw)
        out = {}
        for layer, slot in raw.items():
            attn, q, k = slot["attn"], slot["q"], slot["k"]
            n, t, _ = k.shape
            qh = q.float().view(n, t, attn.num_heads, -1).transpose(1, 2)
            kh = k.float().view(n, t, attn.num_heads, -1).transpose(1, 2)  # [n, H, T, d]
            valid = _valid(slot, n, t, k.device)
            got, wpr = torch.zeros(n, t, device=k.device), torch.zeros(n, t, device=k.device)
            for i in range(n):  # one crop at a time: [H, T, T] probabilities, not [crops, H, T, T]
                at = valid[i]
                qi, ki = qh[i][:, at], kh[i][:, at]
                m = torch.softmax(qi @ ki.transpose(-1, -2) * attn.scale, -1).mean(0)
                got[i, at] = m.mean(0)
                if slot.get("wpr"):
                    wpr[i, at] = weighted_pagerank(m)
            out[layer] = {"received": got, "keys": kh.mean(1)}
            if slot.get("wpr"):
                out[layer]["wpr"] = wpr
            if "hub_t" in slot:
                out[layer]["hub"] = _hub_rows(q, kh, attn, attn.scale, slot["hub_t"], valid)
        return _merge_layers(out, hidden)


def _valid(slot: dict, n: int, t: int, device) -> torch.Tensor:
    """``[crops, T]`` bool: the slots holding a token (all of them unless a tower stage padded rows)."""
    valid = slot.get("valid")
    if valid is None:
        return torch.ones(n, t, dtype=torch.bool, device=device)
    return valid.to(device)


def _hub_rows(q, kh, attn, scale, threshold, valid=None) -> torch.Tensor:
    """``[crops, T]``: per crop, every token's attention from the crop's hub tokens (one crop's
    ``[H, T, T]`` map at a time, over its ``valid`` slots; zeros at the others)."""
    from vtprune.scoring import hub_attention

    n, t, _ = q.shape
    qh = q.float().view(n, t, attn.num_heads, -1).transpose(1, 2)
    out = torch.zeros(n, t, device=kh.device)
    for i in range(n):
        at = slice(None) if valid is None else valid[i]
        out[i, at] = hub_attention(
            torch.softmax(qh[i][:, at] @ kh[i][:, at].transpose(-1, -2) * scale, -1), threshold
        )
    return out


def _merge_layers(a: dict, b: dict) -> dict:
    for layer, tensors in b.items():
        a.setdefault(layer, {}).update(tensors)
    return a


class ReceivedProbe(_Probe):
    """Mean attention received per patch, for towers without CLS (Qwen2-VL)."""

    def install(self, handles: list) -> None:
        """Register the probe's hooks into ``handles`` (as they go: a failure leaves none behind)."""
        tower = self.adapter.vision_tower
        handles.append(tower.register_forward_pre_hook(self._keep_order, with_kwargs=True))
        self.install_hidden(handles)
        for layer in self.layers:
            attention = self.adapter.vision_attention(layer)
            handles.append(attention.register_forward_pre_hook(self._keep(layer), with_kwargs=True))

    def _keep_order(self, module, args, kwargs):
        """Record the patch order the tower's blocks will run on (Qwen2.5-VL: window order)."""
        capture = CAPTURE.get()
        if capture is None:
            return
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        if grid is not None:
            order = self.adapter.vision_patch_order(grid, kwargs)
            if order is not None:
                capture["order"] = order

    def _keep(self, layer: int):
        def hook(module, args, kwargs):
            capture = CAPTURE.get()
            if capture is None:
                return
            hidden = args[0] if args else kwargs["hidden_states"]
            cu = kwargs.get("cu_seqlens", args[1] if len(args) > 1 else None)
            with torch.no_grad():
                capture[layer] = _received_attention(
                    module, hidden, cu, kwargs["position_embeddings"], wpr=self.wpr, hub=self.hub.get(layer)
                )

        return hook

    @classmethod
    def finish(cls, raw: dict) -> dict:
        """Per layer: ``received`` ``[patches]``, ``keys`` ``[patches, head_dim]`` and, for hidden
        layers, ``hidden`` ``[patches, D]``, all in the token order of the tower's input."""
        order = raw.pop("order", None)
        hidden = cls.split_hidden(raw)
        out = {layer: {name: t for name, t in got.items() if t is not None} for layer, got in raw.items()}
        merged = _merge_layers(out, hidden)
        if order is not None:
            inverse = torch.argsort(order)  # blocks[i] = patches[order[i]], so patches = blocks[inverse]
            for tensors in merged.values():
                for name, t in tensors.items():
                    # a block after a tower stage's drop held fewer patches: the tower call puts
                    # them back at their window-order slots first, then reorders them itself
                    if t.shape[0] == inverse.numel():
                        tensors[name] = t[inverse.to(t.device)]
        return merged


def _received_attention(attn, hidden, cu_seqlens, rotary, wpr: bool = False, hub: float | None = None):
    """Per patch: ``received``, the attention it receives averaged over its image's queries and the
    heads; ``keys``, the head-mean keys; with ``wpr``, ``wpr``, the weighted PageRank of the image's
    head-mean map; with a ``hub`` threshold, ``hub``, its attention from the image's hub tokens
    (VFlowOpt). Absent ones are ``None``."""
    rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb_vision
    n = hidden.shape[0]
    q, k, _ = attn.qkv(hidden).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = rope(q, k, *rotary)
    scores, keys, ranks, hubs = [], [], [], []
    bounds = cu_seqlens.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        qi, ki = q[a:b].float().transpose(0, 1), k[a:b].float().transpose(0, 1)  # [H, n, d]
        p = torch.softmax(qi @ ki.transpose(-1, -2) * attn.scaling, dim=-1).mean(0)
        scores.append(p.mean(0))
        keys.append(ki.mean(0))
        if wpr:
            ranks.append(weighted_pagerank(p))
        if hub is not None:
            from vtprune.scoring import hub_attention

            hubs.append(hub_attention(p.unsqueeze(0), hub))  # it averages the heads first: p already is
    return {"received": _cat(scores), "keys": _cat(keys), "wpr": _cat(ranks), "hub": _cat(hubs)}


def _cat(parts: list) -> torch.Tensor | None:
    return torch.cat(parts) if parts else None


def make_probe(
    adapter,
    layers: list[int],
    keys: bool,
    hidden_layers: list[int] = (),
    wpr: bool = False,
    hub: dict | None = None,
):
    if adapter.has_cls:
        probe = ClsProbe
    else:  # a tower run per crop (LLaVA-OneVision) or over packed patches (Qwen2-VL)
        probe = CropReceivedProbe if adapter.tower_tokens_per_crop is not None else ReceivedProbe
    return probe(adapter, layers, keys, hidden_layers, wpr, hub)


def split_per_image(finished: dict, specs: list, adapter) -> list[dict]:
    """Cut the tower-batch tensors into one dict per image (crops of an image are consecutive):
    CLS towers hold one row per crop, the others one per patch (``patches_per_token`` a token)."""
    per_image = [dict() for _ in specs]
    for layer, tensors in finished.items():
        start = 0
        for i, spec in enumerate(specs):
            per_crop = adapter.tower_tokens_per_crop is not None
            size = spec.crops if per_crop else spec.num_tokens * adapter.patches_per_token
            per_image[i][layer] = {name: t[start : start + size] for name, t in tensors.items()}
            start += size
    return per_image
