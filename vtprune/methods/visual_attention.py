"""The attention-side strategies of visual computation skipping, computed sparsely.

* Neighbour window: during prefill a visual query attends to the text before its image and to
  the visual tokens of its image within a ``window x window`` neighbourhood on the grid
  (causally); text queries still see everything. Only those keys are scored: O(w^2 + prefix)
  per visual query instead of O(L).
* Inactive heads: in heads a calibrated mask marks inactive, visual queries are not computed
  (zero output) and text queries do not attend to visual keys (renormalised over the rest, or,
  with ``renormalize=False``, the visual probability mass is dropped as the official code
  does).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vtprune.stages import SkipStage


def _expand_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, H_kv, L, D]`` -> ``[B, H, L, D]`` by repeating each K/V head for its query group."""
    return x.repeat_interleave(heads // x.shape[1], dim=1) if x.shape[1] != heads else x


def _dense(q, k, v, allowed, scaling):
    """Attention of ``q [H, Q, D]`` over ``k, v [H, L, D]`` with ``allowed [Q, L]`` (fp32 softmax)."""
    s = (q.float() @ k.float().transpose(-1, -2)) * scaling
    s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return (p @ v.float()).to(q.dtype)


class GridInfo:
    """Per slot of the current token set: image id, grid row/col, segment, image start."""

    def __init__(self, state, token_set):
        b, n = token_set.orig_index.shape
        orig = state.orig_len
        fields = {
            name: torch.full((b, orig + 1), -1, dtype=torch.long)
            for name in ("img", "r", "c", "seg", "start")
        }
        for row in state.layouts:
            for j, img in enumerate(row):
                pos = img.positions
                for s, seg in enumerate(img.segments):
                    local = seg.indices()
                    rr = torch.arange(seg.rows).repeat_interleave(seg.cols)
                    cc = torch.arange(seg.cols).repeat(seg.rows)
                    p = pos[local]
                    fields["img"][img.row, p] = j
                    fields["seg"][img.row, p] = s
                    fields["r"][img.row, p] = rr
                    fields["c"][img.row, p] = cc
                fields["start"][img.row, pos] = int(pos.min())
        idx = token_set.orig_index.clamp(min=0).cpu()
        for name, table in fields.items():
            setattr(self, name, table.gather(1, idx))
        self.orig = token_set.orig_index.cpu()
        self.valid = token_set.valid.cpu()
        self.visual = token_set.visual.cpu()


class WindowAttentionStage(SkipStage):
    key = "layerskip-window"

    def __init__(self, layers: set[int], window: int):
        self.layers, self.attention_layers, self.window = layers, layers, window

    def attention(self, module, q, k, v, mask, scaling, state):
        token_set = state.sets[state.layer_set[module.layer_idx]]
        grid = state.cached(("grid", id(token_set)), lambda: GridInfo(state, token_set))
        heads = q.shape[1]
        k, v = _expand_kv(k, heads), _expand_kv(v, heads)
        out = torch.zeros(q.shape[0], q.shape[2], heads, q.shape[3], dtype=q.dtype, device=q.device)
        for b in range(q.shape[0]):
            out[b] = self._row(q[b], k[b], v[b], grid, b, scaling).transpose(0, 1)
        return out

    def _row(self, q, k, v, g, b, scaling):
        dev = q.device
        orig, valid = g.orig[b].to(dev), g.valid[b].to(dev)
        # grid tokens get the window; text (and LLaVA-NeXT newline tokens, which sit on no
        # grid cell) attend causally to everything
        gridded = g.visual[b] & (g.img[b] >= 0)
        out = torch.zeros_like(q)
        text_q = torch.nonzero(~gridded).flatten().to(dev)
        if text_q.numel():
            allowed = valid[None, :] & (orig[None, :] <= orig[text_q, None])
            out[:, text_q] = _dense(q[:, text_q], k, v, allowed, scaling)
        for key in sorted({(int(i), int(s)) for i, s in zip(g.img[b][gridded], g.seg[b][gridded])}):
            self._image(q, k, v, g, b, key, out, scaling)
        return out

    def _image(self, q, k, v, g, b, key, out, scaling):
        dev = q.device
        img, seg = key
        members = torch.nonzero((g.img[b] == img) & (g.seg[b] == seg) & g.visual[b]).flatten()
        start = int(g.start[b][members[0]])
        prefix = torch.nonzero(~g.visual[b] & g.valid[b] & (g.orig[b] < start)).flatten()
        rows, cols = int(g.r[b][members].max()) + 1, int(g.c[b][members].max()) + 1
        slot_map = torch.full((rows, cols), -1, dtype=torch.long)
        slot_map[g.r[b][members], g.c[b][members]] = members
        h = self.window // 2
        padded = F.pad(slot_map, (h, h, h, h), value=-1)
        windows = padded.unfold(0, self.window, 1).unfold(1, self.window, 1).reshape(rows, cols, -1)
        nb = windows[g.r[b][members], g.c[b][members]]  # [n, w*w] slots of each query's neighbours
        qo = g.orig[b][members]
        ok = (nb >= 0) & (g.orig[b][nb.clamp(min=0)] <= qo[:, None])
        nb, ok, members, prefix = nb.to(dev), ok.to(dev), members.to(dev), prefix.to(dev)
        qv = q[:, members].float()  # [H, n, D]
        s_pre = (qv @ k[:, prefix].float().transpose(-1, -2)) * scaling  # [H, n, P]
        k_nb = k[:, nb.clamp(min=0)].float()  # [H, n, w*w, D]
        s_nb = (qv.unsqueeze(2) @ k_nb.transpose(-1, -2)).squeeze(2) * scaling  # [H, n, w*w]
        s_nb = s_nb.masked_fill(~ok, float("-inf"))
        p = torch.softmax(torch.cat([s_pre, s_nb], dim=-1), dim=-1)
        p_pre, p_nb = p[..., : prefix.numel()], p[..., prefix.numel() :]
        o = p_pre @ v[:, prefix].float() + (p_nb.unsqueeze(2) @ v[:, nb.clamp(min=0)].float()).squeeze(2)
        out[:, members] = o.to(q.dtype)


class InactiveHeadsStage(SkipStage):
    key = "layerskip-heads"

    def __init__(self, head_mask: dict[int, torch.Tensor], renormalize: bool = True):
        self.head_mask = head_mask
        self.layers = self.attention_layers = {i for i, m in head_mask.items() if not bool(m.all())}
        self.renormalize = renormalize

    decode = True  # decoded (text) tokens must not see visual keys in inactive heads either

    def attention(self, module, q, k, v, mask, scaling, state):
        token_set = state.sets[state.layer_set[module.layer_idx]]
        active = self.head_mask[module.layer_idx].to(q.device)
        heads = q.shape[1]
        k, v = _expand_kv(k, heads), _expand_kv(v, heads)
        key_visual, allowed, query_visual = _key_layout(token_set, q, k, state)
        out = torch.zeros(q.shape[0], q.shape[2], heads, q.shape[3], dtype=q.dtype, device=q.device)
        on = torch.nonzero(active).flatten()
        off = torch.nonzero(~active).flatten()
        for b in range(q.shape[0]):
            if on.numel():
                out[b, :, on] = _dense(q[b, on], k[b, on], v[b, on], allowed[b], scaling).transpose(0, 1)
            text = torch.nonzero(~query_visual[b]).flatten()
            if off.numel() and text.numel():  # inactive heads: visual queries are not computed
                qt, kb, vb = q[b][off][:, text], k[b][off], v[b][off]
                if self.renormalize:  # text queries over the non-visual keys only
                    keys = torch.nonzero(~key_visual[b]).flatten()
                    o = _dense(qt, kb[:, keys], vb[:, keys], allowed[b][text][:, keys], scaling)
                else:  # official: softmax over all keys, visual probabilities zeroed
                    s = (qt.float() @ kb.float().transpose(-1, -2)) * scaling
                    p = torch.softmax(s.masked_fill(~allowed[b][text], float("-inf")), -1).nan_to_num(0.0)
                    o = (p.masked_fill(key_visual[b][None, None, :], 0.0) @ vb.float()).to(q.dtype)
                out[b, text[:, None], off[None, :]] = o.transpose(0, 1)
        return out


def _key_layout(token_set, q, k, state):
    """Visual flags of the keys, the allowed query-key pairs, and visual flags of the queries.

    Prefill: queries are the token set itself (causal by original position). Decode: the keys
    are the set's prompt tokens plus the decoded (text) tokens, all visible but padding.
    """
    dev = q.device
    visual, valid, orig = (t.to(dev) for t in (token_set.visual, token_set.valid, token_set.orig_index))
    if state.prefilling:
        allowed = valid[:, None, :] & (orig[:, None, :] <= orig[:, :, None])
        return visual, allowed, visual
    b, extra = q.shape[0], k.shape[2] - token_set.length
    tail = state.step.decode_tail
    tail = (
        tail[:, -extra:].to(dev) if tail is not None else torch.ones(b, extra, dtype=torch.bool, device=dev)
    )
    key_valid = torch.cat([valid, tail], dim=1)
    key_visual = torch.cat([visual, torch.zeros(b, extra, dtype=torch.bool, device=dev)], dim=1)
    allowed = key_valid[:, None, :].expand(b, q.shape[2], -1)
    return key_visual, allowed, torch.zeros(b, q.shape[2], dtype=torch.bool, device=dev)
