"""Calibrating which attention heads still need visual tokens (for ``layerskip`` head masks).

For each calibration sample and each head of each decoder layer, the *visual share* is the
attention mass that the text tokens after the image put on visual keys (mean over those
queries). A head is active in a sample when its share reaches ``threshold``; it stays active
when that happens in more than ``min_share`` of the samples (the paper's 40%). The first
``keep_layers`` layers keep every head. Shares are recomputed beside SDPA from each layer's
q/k projections, as the pruning scores are.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from vtprune.scoring import apply_rope, head_norms


@dataclass
class HeadMask:
    """Active (True) / inactive heads per decoder layer, with how they were calibrated.

    Example:
        >>> m = HeadMask(active=[[True, False], [True, True]], threshold=0.1)
        >>> m.for_model(2)[0].tolist()
        [True, False]
    """

    active: list[list[bool]]
    threshold: float = 0.1
    min_share: float = 0.4
    keep_layers: int = 2
    samples: int = 0
    shares: list[list[float]] = field(default_factory=list)  # mean visual share per head

    def save(self, path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path) -> HeadMask:
        try:
            data = json.loads(Path(path).read_text())
            return cls(**data)
        except (OSError, json.JSONDecodeError, TypeError) as err:
            raise ValueError(f"layerskip: cannot read a head mask from {path!r}: {err}") from err

    def for_model(self, num_layers: int) -> dict[int, torch.Tensor]:
        if len(self.active) != num_layers:
            raise ValueError(f"head mask has {len(self.active)} layers, the model has {num_layers}")
        return {i: torch.tensor(row, dtype=torch.bool) for i, row in enumerate(self.active)}


def calibrate(
    model, samples, threshold: float = 0.1, min_share: float = 0.4, keep_layers: int = 2
) -> HeadMask:
    """Measure per-head visual attention shares on ``samples`` and return a :class:`HeadMask`.

    Args:
        model: an unpruned supported model.
        samples: an iterable of processor outputs (dicts of tensors), one prompt each.

    Example:
        >>> mask = vtprune.calibrate(model, [processor(images=img, text=prompt, return_tensors="pt")])  # doctest: +SKIP
        >>> mask.save("heads.json"); vtprune.apply(model, "layerskip", head_mask="heads.json")  # doctest: +SKIP
    """
    from vtprune.api import handle_of
    from vtprune.integrations import adapter_for

    if handle_of(model) is not None:
        raise ValueError("vtprune.calibrate needs the unpruned model: call vtprune.remove(model) first")
    adapter = adapter_for(model)
    shares, current = [], {}
    hooks = [
        layer.self_attn.register_forward_pre_hook(_share_hook(i, current), with_kwargs=True)
        for i, layer in enumerate(adapter.layers)
    ]
    try:
        for sample in tqdm(list(samples), desc="calibrate heads", leave=False):
            ids = sample["input_ids"]
            visual = torch.zeros_like(ids, dtype=torch.bool)
            for tid in adapter.visual_token_ids():
                visual |= ids == tid
            current.clear()
            current["visual"] = visual
            with torch.no_grad():
                model(**sample)
            shares.append(torch.stack([current[i] for i in range(len(adapter.layers))]))
    finally:
        for h in hooks:
            h.remove()
    stacked = torch.stack(shares)  # [S, layers, heads]
    active = (stacked >= threshold).float().mean(0) > min_share
    active[:keep_layers] = True
    return HeadMask(
        active=active.tolist(),
        threshold=threshold,
        min_share=min_share,
        keep_layers=keep_layers,
        samples=len(shares),
        shares=stacked.mean(0).tolist(),
    )


def _share_hook(i: int, current: dict):
    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        cos, sin = kwargs["position_embeddings"]
        visual = current["visual"][0].to(hidden.device)
        b, n, _ = hidden.shape
        hd = module.head_dim
        q = module.q_proj(hidden).view(b, n, -1, hd).transpose(1, 2)
        k = module.k_proj(hidden).view(b, n, -1, hd).transpose(1, 2)
        q, k = head_norms(module, q, k)
        q, k = apply_rope(q, cos, sin)[0], apply_rope(k, cos, sin)[0]
        k = k.repeat_interleave(q.shape[0] // k.shape[0], dim=0)
        after = visual.long().cummax(0).values.bool() & ~visual
        queries = torch.nonzero(after).flatten()
        if queries.numel() == 0:
            current[i] = torch.zeros(q.shape[0])
            return
        s = (q[:, queries].float() @ k.float().transpose(-1, -2)) * module.scaling
        causal = torch.arange(n, device=s.device)[None, :] <= queries[:, None]
        p = torch.softmax(s.masked_fill(~causal, float("-inf")), dim=-1)
        current[i] = p[..., visual].sum(-1).mean(-1).cpu()  # [heads]

    return hook
