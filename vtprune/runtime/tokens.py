"""Which tokens are present at a given depth, and how to compact a batch to a kept subset.

Rows of a batch may keep different numbers of tokens (different visual counts, imageless
prompts). A compacted batch is left-padded to the longest row: padding slots are marked in
``present`` (and never attendable), exactly like the left padding ``generate`` already uses,
so Hugging Face's own mask builders handle them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import vtprune.kernels as kernels


@dataclass
class TokenSet:
    """The tokens seen by a run of decoder layers starting at ``start_layer``.

    All tensors are ``[B, N]``: ``lm_index`` indexes the language model's input sequence
    (0 at padding slots), ``orig_index`` the caller's original sequence (-1 at padding),
    ``present`` marks real slots, ``valid`` slots that may be attended (present and not
    masked by the caller's attention mask), ``visual`` image tokens.
    """

    start_layer: int
    lm_index: torch.Tensor
    orig_index: torch.Tensor
    present: torch.Tensor
    valid: torch.Tensor
    visual: torch.Tensor

    @property
    def length(self) -> int:
        return self.lm_index.shape[1]

    @property
    def has_padding(self) -> bool:
        return not bool(self.present.all())

    def visual_counts(self) -> torch.Tensor:
        return self.visual.sum(1)

    def select(self, slots: torch.Tensor, present: torch.Tensor, start_layer: int) -> TokenSet:
        """The subset at ``slots`` (``[B, M]`` indices into this set; padding where not present)."""

        def take(x, fill):
            return x.gather(1, slots).masked_fill(~present, fill)

        return TokenSet(
            start_layer=start_layer,
            lm_index=take(self.lm_index, 0),
            orig_index=take(self.orig_index, -1),
            present=present,
            valid=take(self.valid, False),
            visual=take(self.visual, False),
        )

    def query_slot(self) -> torch.Tensor:
        """Per row, the slot of the last valid token (the query FastV/PDrop score with)."""
        n = self.length
        idx = torch.arange(n, device=self.valid.device).expand_as(self.valid)
        return torch.where(self.valid, idx, -1).max(dim=1).values

    def last_real(self) -> torch.Tensor:
        """``[B, N]`` bool: the last valid token of each row (none in an all-padding row)."""
        slot = self.query_slot()
        idx = torch.arange(self.length, device=slot.device).expand(slot.shape[0], -1)
        return idx == slot.unsqueeze(1)

    def to(self, device) -> TokenSet:
        if self.lm_index.device == torch.device(device):
            return self
        return TokenSet(
            self.start_layer,
            *(t.to(device) for t in (self.lm_index, self.orig_index, self.present, self.valid, self.visual)),
        )


def compact(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded gather indices for the kept slots of each row.

    Args:
        keep: ``[B, N]`` bool, the slots that survive (order is preserved).

    Returns:
        ``slots [B, M]`` (indices into the ``N`` slots; 0 at padding) and ``present [B, M]``,
        with ``M`` the largest number kept by any row.

    Example:
        >>> s, p = compact(torch.tensor([[True, False, True], [True, True, True]]))
        >>> s.tolist(), p.tolist()
        ([[0, 0, 2], [0, 1, 2]], [[False, True, True], [True, True, True]])
    """
    b, n = keep.shape
    counts = keep.sum(1)
    m = int(counts.max()) if b else 0
    pad = m - counts
    dest = torch.where(keep, keep.cumsum(1) - 1 + pad.unsqueeze(1), m)
    out = torch.zeros(b, m + 1, dtype=torch.long, device=keep.device)
    out.scatter_(1, dest, torch.arange(n, device=keep.device).expand(b, n))
    present = torch.arange(m, device=keep.device).unsqueeze(0) >= pad.unsqueeze(1)
    return out[:, :m], present


def gather_seq(x: torch.Tensor, slots: torch.Tensor, present: torch.Tensor | None = None, dim: int = 1):
    """Gather ``x`` along sequence dim ``dim`` by per-row ``slots``; zero padding slots.

    Handles ``[B, N, ...]`` tensors (dim 1, through the gather kernel: Triton on CUDA) and
    position tensors ``[k, B, N]`` (dim 2); a batch-1 ``x`` (broadcast rotary tables) is
    expanded to the batch of ``slots``.
    """
    if dim == 1 and x.dim() >= 3:
        return gather_many([x], slots, present)[0]
    b = slots.shape[0]
    slots = slots.to(x.device)
    if x.dim() == 2:  # positions [B, N]
        return x.expand(b, x.shape[1]).gather(1, slots)
    if x.shape[1] != b:  # positions [k, B, N]
        x = x.expand(x.shape[0], b, x.shape[2])
    return x.gather(2, slots.unsqueeze(0).expand(x.shape[0], -1, -1))


def gather_many(xs: list[torch.Tensor], slots: torch.Tensor, present: torch.Tensor | None = None):
    """Gather several ``[B, N, D]`` tensors sharing one index in one kernel call."""
    index = slots if present is None else torch.where(present, slots, -1)
    return kernels.gather_rows(list(xs), index.to(xs[0].device))
