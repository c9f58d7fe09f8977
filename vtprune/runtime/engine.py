"""The hooks that carry out a plan inside one model instance.

Four hook points, all instance-level ``register_forward_pre_hook(..., with_kwargs=True)`` /
``register_forward_hook`` handles recorded for exact removal:

* outer model (``*ForConditionalGeneration``): publishes ``labels`` for training-mode scores;
* multimodal model: starts a request at prefill (visual layouts) or finds it on the cache at a
  decode step (and supplies original positions when the caller gave none);
* language model: runs the vision stages and compacts ``inputs_embeds`` / mask / positions at
  prefill, remaps the caller's 2-D mask onto layer 0's cache at decode; afterwards scatters the
  final hidden states back to the caller's sequence length;
* each decoder layer: runs prefill stages at their layer, and hands every later layer the
  rotary tables, attention mask and (absent) position ids of the tokens it really holds.

Plans whose prefill stages read decoder sub-layers (TransPrune) also hook the attention and MLP
modules of those layers only (``taps.py``).

This module installs the hooks and routes each call; what runs at prefill (stages, compaction)
lives in ``prefill.py`` and what runs at decode (masks over pruned caches, cache re-indexing)
in ``decode.py``.
"""

from __future__ import annotations

import inspect
import threading

import torch
from transformers import DynamicCache

from vtprune import compat
from vtprune.stages import DecodeStage, PrefillStage, SkipStage, TowerStage, VisionStage
from vtprune.stats import PruneStats

from .attention import wrapper_name
from .decode import compact_layer_caches, layer_mask, reindex_caches, remap_lm_mask
from .encoder import EncoderTap
from .injection import wrap_injection
from .plumbing import bind_call, refuse_compiled, refuse_unsupported
from .prefill import prefill_layer, run_vision_stages
from .state import ACTIVE, LABELS, RequestState, StepScratch, attach_to_cache, state_of_cache
from .taps import install_taps, plan_taps
from .tokens import TokenSet
from .tower import TowerRun
from .tower_families import tower_run_class
from .vision import make_probe


class Runtime:
    """Hooks for one model instance and one plan (vision stages + prefill stages by layer)."""

    def __init__(self, model, adapter, stages: list, wiring: compat.Wiring, timing: bool = False):
        self.model = model
        self.adapter = adapter
        self.wiring = wiring
        self.timing = timing  # measure overhead_s (synchronises CUDA around every stage)
        self.vision_stages = [s for s in stages if isinstance(s, VisionStage)]
        tower_stages = [s for s in stages if isinstance(s, TowerStage)]
        self.tower = check_tower_plan(adapter, tower_stages)
        self.decode_stages = [s for s in stages if isinstance(s, DecodeStage)]
        self.skip_stages = [s for s in stages if isinstance(s, SkipStage)]
        self.attention_handlers = {layer: s for s in self.skip_stages for layer in s.attention_layers}
        # decode stages that read each layer's prefill q/k as the attention backend receives them
        self.score_taps: dict[int, list[DecodeStage]] = {}
        for s in self.decode_stages:
            for layer in s.tap_layers(len(adapter.layers)):
                self.score_taps.setdefault(layer, []).append(s)
        self.owner = id(model)
        self._attn_restore = None
        self.prefill_stages: dict[int, list[PrefillStage]] = {}
        for s in stages:
            if isinstance(s, PrefillStage):
                self.prefill_stages.setdefault(s.layer, []).append(s)
        check_shared_layers(self.prefill_stages)
        self.capture_layers = {
            s.layer - 1 for group in self.prefill_stages.values() for s in group if s.needs_previous_input
        }
        self.value_layers = {
            s.layer - 1 for group in self.prefill_stages.values() for s in group if s.needs_previous_values
        }
        self.taps = plan_taps(self.prefill_stages)
        self.keep_lm_input = any(s.needs_lm_input for group in self.prefill_stages.values() for s in group)
        self.handles: list = []
        self.patched_methods: list[str] = []
        self.patched_forwards: list = []
        layers = sorted({layer for st in self.vision_stages for layer in st.vision_layers(adapter)})
        hidden = sorted({layer for st in self.vision_stages for layer in st.vision_hidden_layers(adapter)})
        keys = any(st.needs_keys for st in self.vision_stages)
        wpr = check_tower_score(adapter, self.vision_stages)
        hub = {layer: t for st in self.vision_stages for layer, t in st.vision_hub(adapter).items()}
        self.probe = make_probe(adapter, layers, keys, hidden, wpr, hub) if layers or hidden else None
        self.encoder = EncoderTap(adapter, self.probe, self._mine, self.tower)
        # the tower's survivors shrink the image placeholders first, like a vision stage's picks
        self.lm_input_stages = tower_stages + self.vision_stages
        self._per_thread = threading.local()  # each thread's last request (stats(model))
        self._mm_signature = inspect.signature(adapter.mm_model.forward)  # read once, bound per call

    @property
    def last_stats(self) -> PruneStats | None:
        """The calling thread's last request on this model."""
        return getattr(self._per_thread, "stats", None)

    # -- installation ---------------------------------------------------------------------
    def install(self) -> None:
        a = self.adapter
        if a.outer is not None:
            self.handles.append(a.outer.register_forward_pre_hook(self._outer_pre, with_kwargs=True))
            self.handles.append(a.outer.register_forward_hook(self._outer_post, always_call=True))
        self.handles.append(a.mm_model.register_forward_pre_hook(self._mm_pre, with_kwargs=True))
        self.handles.append(a.mm_model.register_forward_hook(self._mm_post, always_call=True))
        self.handles.append(a.language_model.register_forward_pre_hook(self._lm_pre, with_kwargs=True))
        self.handles.append(a.language_model.register_forward_hook(self._lm_post, with_kwargs=True))
        for i, layer in enumerate(a.layers):
            hook = self._make_layer_hook(i)
            self.handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
        if self.probe is not None:
            self.probe.install(self.handles)
        if self.tower is not None:
            self.tower.install(self.handles)
        for i in self.capture_layers:
            attn = a.layers[i].self_attn
            self.handles.append(attn.q_proj.register_forward_hook(self._keep_projection(0)))
            self.handles.append(attn.k_proj.register_forward_hook(self._keep_projection(1)))
        for i in self.value_layers:
            self.handles.append(a.layers[i].self_attn.v_proj.register_forward_hook(self._keep_values))
        install_taps(self.taps, a.layers, self._mine, self.handles)
        if self.attention_handlers or self.score_taps:
            cfg = a.text_config
            self._attn_restore = cfg._attn_implementation
            cfg._attn_implementation = wrapper_name(cfg._attn_implementation)
        for i, layer in enumerate(a.layers):
            stages = [s for s in self.skip_stages if i in s.layers and type(s).mlp is not SkipStage.mlp]
            if stages:
                self._patch_forward(layer.mlp, self._make_mlp_forward(i, layer.mlp, stages))
        for name in a.encoder_methods():
            if hasattr(a.mm_model, name):
                setattr(a.mm_model, name, self.encoder.wrap(getattr(a.mm_model, name)))
                self.patched_methods.append(name)
        if a.injection_method is not None:
            # DeepStack-style features added between decoder layers follow the kept tokens
            name = a.injection_method
            self._patch_method(
                a.language_model, name, wrap_injection(getattr(a.language_model, name), self._mine)
            )

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        for name in self.patched_methods:
            # the wrapper is an instance attribute shadowing the class method: deleting restores it
            self.adapter.mm_model.__dict__.pop(name, None)
        self.patched_methods.clear()
        if self._attn_restore is not None:
            self.adapter.text_config._attn_implementation = self._attn_restore
            self._attn_restore = None
        for module, name, previous in self.patched_forwards:
            if previous is None:
                module.__dict__.pop(name, None)
            else:
                setattr(module, name, previous)
        self.patched_forwards.clear()

    def _keep_values(self, module, args, output):
        """Keep a scoring layer's v projection output during prefill (FlowCut's LLM prune)."""
        state = ACTIVE.get()
        if self._mine(state) and state.prefilling:
            state.step.memo["previous_v"] = output

    def _keep_projection(self, which: int):
        """Keep the q (0) or k (1) projection output of a scoring layer during prefill.

        FastV and MustDrop score with the attention of the layer before the pruning point; its
        projections are computed anyway, so keeping them avoids recomputing any of them.
        """

        def hook(module, args, output):
            state = ACTIVE.get()
            if self._mine(state) and state.prefilling:
                pair = list(state.step.captured_qk or (None, None))
                pair[which] = output
                state.step.captured_qk = tuple(pair)

        return hook

    def _patch_forward(self, module, forward) -> None:
        """Shadow ``module.forward`` on this instance only, remembering what was there."""
        self._patch_method(module, "forward", forward)

    def _patch_method(self, module, name: str, fn) -> None:
        """Shadow ``module.<name>`` on this instance only, remembering what was there."""
        self.patched_forwards.append((module, name, module.__dict__.get(name)))
        setattr(module, name, fn)

    def _make_mlp_forward(self, i: int, mlp, stages):
        full = mlp.forward

        def forward(x):
            state = ACTIVE.get()
            if not self._mine(state) or not state.prefilling:
                return full(x)
            visual = state.sets[state.layer_set[i]].visual.to(x.device)
            stage = stages[0]  # one skip stage per layer (apply refuses duplicate keys)
            return stage.mlp(mlp, x, visual, full)

        return forward

    # -- outer / multimodal model ---------------------------------------------------------
    def _outer_pre(self, module, args, kwargs):
        refuse_compiled()
        LABELS.set(kwargs.get("labels"))

    def _outer_post(self, module, args, output):
        LABELS.set(None)

    def _mm_post(self, module, args, output):
        ACTIVE.set(None)

    def _mine(self, state) -> bool:
        return state is not None and state.owner == id(self.model)

    def _mm_pre(self, module, args, kwargs):
        refuse_unsupported(compat.get_cache(kwargs))
        call = bind_call(self._mm_signature, args, kwargs)
        cache = compat.get_cache(call)
        state = state_of_cache(cache)
        if self._mine(state) and cache.get_seq_length() > 0:
            return self._start_decode(state, call, cache)
        if cache is not None and cache.get_seq_length() > 0:
            raise NotImplementedError(
                "vtprune: continuing from a KV cache filled without this pruning plan (prefix caching, "
                "multi-turn cache reuse) is not supported; start generation from an empty cache"
            )
        self._start_prefill(call)
        return None

    def _start_prefill(self, call: dict) -> None:
        ids = call.get("input_ids")
        embeds = call.get("inputs_embeds")
        ref = ids if ids is not None else embeds
        state = RequestState(owner=id(self.model), batch=ref.shape[0], orig_len=ref.shape[1], runtime=self)
        state.prefilling = True
        state.overhead_s = 0.0 if self.timing else None
        if ids is not None:
            self.adapter.check_call(call)
            state.input_ids = ids
            specs, vision = self.encoder.specs_for_call(call)
            state.layouts = self.adapter.layouts(ids, specs, vision)
        else:
            # without input_ids the placeholders cannot be located reliably: prune nothing
            state.layouts = [[] for _ in range(ref.shape[0])]
        labels = LABELS.get()
        if labels is not None and labels.shape[-1] == ref.shape[1]:
            answer = labels != -100
            before = torch.zeros_like(answer)
            before[:, :-1] = answer[:, 1:] & ~answer[:, :-1]
            state.answer_query = before
        ACTIVE.set(state)

    def _start_decode(self, state: RequestState, call: dict, cache):
        ids = call.get("input_ids")
        ref = ids if ids is not None else call["inputs_embeds"]
        q_len = ref.shape[1]
        if q_len != 1:
            raise NotImplementedError(
                f"vtprune: a {q_len}-token step on a pruned KV cache (chunked prefill, assisted or "
                "speculative decoding, prompt continuation) is not supported; decode one token per step"
            )
        state.prefilling = False
        state.step = StepScratch()
        ACTIVE.set(state)
        if call.get("position_ids") is None:
            # get_seq_length is layer 0's cache: subtract the prompt slots that layer holds
            seen = state.orig_len + cache.get_seq_length() - state.sets[state.layer_set[0]].length
            call["position_ids"] = self.adapter.decode_position_ids(
                seen, q_len, ref.shape[0], ref.device, attention_mask=call.get("attention_mask")
            )
            return (), call
        return None

    # -- language model ------------------------------------------------------------------
    def _lm_pre(self, module, args, kwargs):
        state = ACTIVE.get()
        if not self._mine(state):
            return None
        refuse_compiled()  # also when only the language model is compiled
        if state.prefilling:
            return self._lm_prefill(state, args, kwargs)
        return remap_lm_mask(state, args, kwargs)

    def _lm_prefill(self, state: RequestState, args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            raise ValueError("vtprune: the language model was called without inputs_embeds")
        b, n, _ = embeds.shape
        dev = embeds.device
        mask2d = kwargs.get("attention_mask")
        if mask2d is not None and (isinstance(mask2d, dict) or mask2d.dim() != 2):
            raise NotImplementedError(
                "vtprune: pre-built 4-D / per-layer-type attention masks are not supported"
            )
        valid = mask2d.bool() if mask2d is not None else torch.ones(b, n, dtype=torch.bool, device=dev)
        visual = torch.zeros(b, n, dtype=torch.bool, device=dev)
        for row in state.layouts:
            for img in row:
                visual[img.row, img.positions.to(dev)] = True
        idx = torch.arange(n, device=dev).expand(b, n)
        base = TokenSet(0, idx, idx, torch.ones_like(valid), valid, visual)
        state.visual_in = visual.sum(1)
        state.sets = [base]
        state.layer_set = [0] * len(self.adapter.layers)
        if self.lm_input_stages:
            with state.timed():
                run_vision_stages(state, self.lm_input_stages, self.adapter, base, embeds, kwargs)
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = self.adapter.text_config.use_cache
        cache = compat.get_cache(kwargs)
        if cache is None and use_cache:
            cache = DynamicCache(config=self.adapter.text_config)
            compat.set_cache(kwargs, cache, self.wiring.cache_arg)
        if cache is not None:
            attach_to_cache(cache, state)
        return args, kwargs

    def _lm_post(self, module, args, kwargs, output):
        state = ACTIVE.get()
        if not self._mine(state) or not state.prefilling:
            return None
        stats = state.stats = self._per_thread.stats = PruneStats.from_state(state, len(self.adapter.layers))
        cache = compat.get_cache(kwargs)
        final = state.sets[-1]  # the set the last layer ran on (decode stages add cache-only sets)
        if self.decode_stages and cache is not None:
            with state.timed():
                reindex_caches(state, self.decode_stages, cache)
                for stage in self.decode_stages:
                    compact_layer_caches(state, stage.layer_keep(state), cache)
            stats.kv_cache_lengths = [state.sets[s].length for s in state.layer_set]
            if self.score_taps:
                stats.kv_positions = [
                    [row[p].cpu() for row, p in zip(t.orig_index, t.present)]
                    for t in (state.sets[s] for s in state.layer_set)
                ]
        if final.length == state.orig_len and not final.has_padding:
            stats.overhead_s = state.overhead_s
            return None
        with state.timed():
            h = output.last_hidden_state
            b, _, d = h.shape
            dest = torch.where(final.present, final.orig_index, state.orig_len).to(h.device)
            full = h.new_zeros(b, state.orig_len + 1, d)
            full.scatter_(1, dest.unsqueeze(-1).expand(-1, -1, d), h)
            output.last_hidden_state = full[:, : state.orig_len]
        stats.overhead_s = state.overhead_s
        return output

    # -- decoder layers -------------------------------------------------------------------
    def _make_layer_hook(self, i: int):
        def hook(module, args, kwargs):
            state = ACTIVE.get()
            if not self._mine(state):
                return None
            refuse_compiled()  # also when only the decoder layers are compiled
            if state.prefilling:
                stages = self.prefill_stages.get(i, ())
                return prefill_layer(state, stages, self.adapter, i, args, kwargs, self.keep_lm_input)
            return layer_mask(state, self.adapter.text_config, i, args, kwargs)

        return hook


def check_shared_layers(prefill_stages: dict) -> None:
    """Refuse two prefill stages at one decoder layer when a later one reads the previous layer's
    q/k/v: the first one's drop leaves them describing tokens that are gone (e.g. FlowCut's
    LLaVA-NeXT prune before layer 2 with MustDrop's or FastV's prune there)."""
    for layer, group in prefill_stages.items():
        late = [s.key for s in group[1:] if s.needs_previous_input or s.needs_previous_values]
        if late:
            raise NotImplementedError(
                f"vtprune: {', '.join(s.key for s in group)} all prune before decoder layer {layer}, and "
                f"{', '.join(late)} reads layer {layer - 1}'s attention, which the first drop invalidates; "
                "move one of them to another layer"
            )


def check_tower_score(adapter, vision_stages: list) -> bool:
    """Whether a vision stage reads the weighted-PageRank score (``score="wpr"``); refused, naming
    the option, where the tower has CLS (its stages read the CLS row, not a whole map)."""
    wpr = [s.key for s in vision_stages if s.tower_score == "wpr"]
    if wpr and adapter.has_cls:
        raise ValueError(
            f"{wpr[0]}: option 'score'='wpr' is invalid for this model; allowed: 'attention' (its "
            f"{adapter.family} vision tower has a CLS token, whose attention row the method reads; "
            "'wpr' is the CLS-free score for towers without one: Qwen2-VL, Qwen2.5-VL, Qwen3-VL, "
            "LLaVA-OneVision)"
        )
    return bool(wpr)


FAMILY_NAMES = {
    "llava": "LLaVA-1.5",
    "llava_next": "LLaVA-NeXT",
    "qwen2_vl": "Qwen2-VL",
    "qwen2_5_vl": "Qwen2.5-VL",
    "qwen3_vl": "Qwen3-VL",
    "llava_onevision": "LLaVA-OneVision",
}


def check_tower_plan(adapter, tower_stages: list) -> TowerRun | None:
    """The tower hooks of a plan, or a clear error for what tower stages do not support yet.
    Vision stages in the same plan choose among the tower's survivors (``runtime/survivors.py``) on
    every family: each tower runner's ``expand`` puts the scores and keys captured after a drop
    back at their original slots (crops, window order, merge groups, resampling taps)."""
    if not tower_stages:
        return None
    keys = ", ".join(s.key for s in tower_stages)
    if len(tower_stages) > 1:
        raise NotImplementedError(f"vtprune: one tower stage per plan is supported, got {keys}")
    adapter.check_tower_stage(keys)
    (stage,) = tower_stages
    if stage.families is not None and adapter.family not in stage.families:
        raise NotImplementedError(
            f"vtprune: {keys} prunes inside the vision tower and is supported on "
            f"{' and '.join(FAMILY_NAMES.get(f, f) for f in stage.families)} so far, not on "
            f"{FAMILY_NAMES.get(adapter.family, adapter.family)}"
        )
    run = tower_run_class(adapter)(adapter, tower_stages)
    if not run.after:
        raise NotImplementedError(
            f"vtprune: {keys} reads tower layers before the feature layer, and this model's features "
            f"come from tower layer {run.feature_layer} (the first): there is nothing to prune before it"
        )
    return run
