"""Per-request state (rule 4): one typed object per generate call / forward, never global.

A :class:`RequestState` is created at prefill, attached to the request's KV cache object (so
decode steps of that request, and only those, find it) and published for the duration of one
forward call in a ``ContextVar`` (per thread and per call, so two threads or two models never
share it).
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from dataclasses import dataclass, field

import torch

from .tokens import TokenSet

CACHE_ATTR = "_vtprune_state"

ACTIVE: contextvars.ContextVar[RequestState | None] = contextvars.ContextVar("vtprune_active", default=None)
LABELS: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar("vtprune_labels", default=None)
REPLAY: contextvars.ContextVar[dict | None] = contextvars.ContextVar("vtprune_replay", default=None)


@dataclass
class StepScratch:
    """Per forward call: tensors shared by all layers of one token set, built once per call."""

    decode_tail: torch.Tensor | None = None  # caller's mask columns after the prompt (decode)
    masks: dict = field(default_factory=dict)  # set index -> attention mask for its layers
    rotary: dict = field(default_factory=dict)  # set index -> (cos, sin) at its slots
    lm_rotary: tuple | None = None  # the language model's full-length (cos, sin)
    captured_qk: tuple | None = None  # q/k projection outputs of a scoring layer
    memo: dict = field(default_factory=dict)  # other per-call values shared by layers


@dataclass
class RequestState:
    """Everything one request's pruning needs, from prefill through its decode steps."""

    owner: int  # id() of the model that created it
    batch: int
    orig_len: int
    sets: list[TokenSet] = field(default_factory=list)
    layer_set: list[int] = field(default_factory=list)
    selections: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    visual_in: torch.Tensor | None = None  # per row, visual tokens in the prompt
    visual_tower: torch.Tensor | None = None  # per row, visual tokens a tower stage let through
    overhead_s: float | None = None  # None unless the plan was applied with timing=True
    step: StepScratch = field(default_factory=StepScratch)
    answer_query: torch.Tensor | None = None  # [B, orig_len] bool (training-mode PDrop)
    protected: torch.Tensor | None = None  # [B, orig_len] bool, tokens no stage may drop
    runtime: object = None  # the Runtime serving this request (its attention handlers)
    stats: object = None  # the PruneStats of this request, once its prefill is done
    input_ids: torch.Tensor | None = None  # [B, orig_len] the prompt (vision stages' instruction ids)

    def cached(self, key, build):
        """A value built once per forward call (e.g. per-slot grid tables shared by layers)."""
        if key not in self.step.memo:
            self.step.memo[key] = build()
        return self.step.memo[key]

    # -- token sets -----------------------------------------------------------------------
    def set_for_layer(self, layer: int) -> int:
        return self.layer_set[layer] if layer < len(self.layer_set) else len(self.sets) - 1

    def record_selection(self, key: str, token_set: TokenSet, keep_visual: torch.Tensor) -> None:
        """Remember the kept visual tokens (original indices per row) for stats and replay."""
        orig = token_set.orig_index
        self.selections[key] = [orig[b][keep_visual[b]].cpu() for b in range(orig.shape[0])]

    def reorder(self, beam_idx: torch.Tensor) -> None:
        """Follow a beam-search reordering of the batch (the cache's rows move, so must ours)."""
        idx = beam_idx.to(self.sets[0].lm_index.device)
        for i, s in enumerate(self.sets):
            self.sets[i] = TokenSet(
                s.start_layer,
                *(
                    t.index_select(0, idx.to(t.device))
                    for t in (s.lm_index, s.orig_index, s.present, s.valid, s.visual)
                ),
            )
        cpu_idx = beam_idx.cpu().tolist()
        for key, rows in self.selections.items():
            self.selections[key] = [rows[i] for i in cpu_idx]

    @contextlib.contextmanager
    def timed(self):
        """Add the wall time of the block to ``overhead_s`` when the plan asked for timing.

        Timing synchronises CUDA before and after the block (otherwise it would time kernel
        launches, not work), which stalls the stream at every pruning point: so it only happens
        with ``apply(..., timing=True)``; otherwise ``overhead_s`` stays ``None`` (not measured).
        """
        if self.overhead_s is None:
            yield
            return
        dev = self.sets[0].lm_index.device if self.sets else None
        if dev is not None and dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if dev is not None and dev.type == "cuda":
                torch.cuda.synchronize(dev)
            self.overhead_s += time.perf_counter() - t0


def state_of_cache(cache) -> RequestState | None:
    return getattr(cache, CACHE_ATTR, None) if cache is not None else None


def attach_to_cache(cache, state: RequestState) -> None:
    """Attach ``state`` to a request's cache, and make beam reordering move it along."""
    setattr(cache, CACHE_ATTR, state)
    reorder = getattr(cache, "reorder_cache", None)
    if reorder is not None and not getattr(reorder, "_vtprune", False):

        def reorder_cache(beam_idx, _orig=reorder):
            _orig(beam_idx)
            st = getattr(cache, CACHE_ATTR, None)
            if st is not None:
                st.reorder(beam_idx)

        reorder_cache._vtprune = True
        cache.reorder_cache = reorder_cache


@contextlib.contextmanager
def replay(selections: dict[str, list[torch.Tensor]]):
    """Reuse a previous prefill's selections instead of recomputing them.

    Every stage keeps exactly the visual tokens (original positions) it kept before. This is
    how a cached ``generate`` is checked against stepping the pruned model without a cache:
    the uncached reference must see the same selection while its prompt grows.

    Example:
        >>> # out = model.generate(**inputs); sel = vtprune.stats(model).selections
        >>> # with vtprune.replay(sel): logits = model(**longer_inputs, use_cache=False).logits
    """
    token = REPLAY.set(selections)
    try:
        yield
    finally:
        REPLAY.reset(token)
