"""Efficiency meters of one plan: tokens, FLOPs, latency, KV-cache bytes, peak memory, overhead.

:func:`measure_plans` measures the unpruned model and every plan on the same encoded inputs,
interleaving the plans inside each timing repeat (EVAL.md: on small shared CPUs only interleaved
runs in one process are comparable). Every number is **per sample** unless its key says
``batch``; the meters are usually taken on a batch of one, the papers' convention.

Keys of one plan's meters (see :data:`METER_KEYS`): token accounting from :func:`vtprune.stats`
(or from the input ids for the unpruned model), ``flops_counted`` (``FlopCounterMode`` on one
prefill with ``logits_to_keep=1``, as ``generate`` runs it; CPU SDPA kernels are not counted
by PyTorch), ``flops_formula`` (the papers' ``4nd^2 + 2n^2d + 3ndm`` over visual tokens per
layer), ``prefill_s`` / ``decode_s_per_token`` / ``generate_s`` (medians), ``kv_cache_bytes``
after prefill, ``peak_memory_bytes`` (how: ``peak_memory_kind``) and ``overhead_share``
(method time / prefill time), plus the timer, repeats and thread settings used.
``tower_tokens_per_layer`` (per image: what a tower stage left at each vision-tower layer, or the
unpruned count) and ``tower_flops`` (:func:`vtprune.flops.tower_flops` on it: the tower's layers
by formula, attention included) record the vision tower apart.
"""

from __future__ import annotations

import os
import statistics

import torch

import vtprune
from vtprune.eval.harness.plans import apply_plan
from vtprune.eval.harness.timers import StepClock, peak_memory, time_call
from vtprune.flops import count_flops, paper_flops, tower_flops
from vtprune.integrations import adapter_for

METER_KEYS = (
    "visual_tokens_in",
    "visual_tokens_per_layer",
    "equivalent_tokens",
    "keep_ratio",
    "tower_tokens_per_layer",
    "tower_flops",
    "flops_counted",
    "flops_formula",
    "prefill_s",
    "decode_s_per_token",
    "generate_s",
    "kv_cache_bytes",
    "peak_memory_bytes",
    "peak_memory_delta_bytes",
    "overhead_s",
    "overhead_share",
)


def kv_cache_bytes(text_config, lengths: list[float], dtype: torch.dtype) -> int:
    """Sum over layers of ``2 * n_kv_heads * head_dim * tokens_in_layer * dtype_bytes``.

    Example:
        >>> from types import SimpleNamespace
        >>> cfg = SimpleNamespace(hidden_size=4096, num_attention_heads=32, num_key_value_heads=32)
        >>> kv_cache_bytes(cfg, [600] * 32, torch.float16) / 2**20  # LLaVA-1.5-7B, 600 tokens
        300.0
    """
    heads = text_config.num_attention_heads
    kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
    size = torch.empty((), dtype=dtype).element_size()
    return int(sum(2 * kv_heads * head_dim * n * size for n in lengths))


def tower_accounting(model, inputs: dict, recorded: list[float] | None) -> dict:
    """Per image, the tokens each vision-tower layer ran on (``recorded`` from
    :func:`vtprune.stats`, or the unpruned count: tower tokens per crop times the crops, or the
    patches of the image) and the tower's FLOPs by formula (the crops as separate attention
    sequences). Images of one batch are assumed alike (the meters run a batch of one).

    Example:
        >>> tower_accounting(model, inputs, None)["tower_tokens_per_layer"][:2]  # doctest: +SKIP
        [577.0, 577.0]
    """
    adapter = adapter_for(model)
    vc = adapter.config.vision_config
    crops = 1
    pixels = inputs.get("pixel_values")
    if adapter.tower_tokens_per_crop is not None and pixels is not None:
        batch = int(inputs["input_ids"].shape[0])
        crops = pixels.shape[1] if pixels.dim() == 5 else max(1, pixels.shape[0] // batch)
    if recorded is None:
        if adapter.tower_tokens_per_crop is not None:
            per_image = float(adapter.tower_tokens_per_crop * crops)
        else:
            grid = inputs.get("image_grid_thw")
            per_image = float(grid.prod(-1).float().mean()) if grid is not None else 0.0
        recorded = [per_image] * adapter.vision_layers_count
    return {
        "tower_tokens_per_layer": list(recorded),
        "tower_flops": tower_flops(vc, list(recorded), sequences=crops),
    }


def _prefill(model, inputs: dict):
    with torch.inference_mode():
        return model(**inputs, logits_to_keep=1, use_cache=True)


def _generate(model, inputs: dict, tokens: int, clock: StepClock | None = None):
    from transformers import LogitsProcessorList

    extra = {"logits_processor": LogitsProcessorList([clock])} if clock is not None else {}
    # min_new_tokens keeps EOS from ending the run early: every plan decodes the same count
    with torch.inference_mode():
        return model.generate(
            **inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, use_cache=True, **extra
        )


def token_accounting(model, inputs: dict, plan: str) -> dict:
    """Visual tokens in / per layer, equivalent tokens, keep ratio, KV lengths and overhead of the last prefill.

    The unpruned model has no :func:`vtprune.stats`: its counts come from the input ids.

    Example:
        >>> token_accounting(model, inputs, "baseline")["keep_ratio"]  # doctest: +SKIP
        1.0
    """
    adapter = adapter_for(model)
    if plan != "baseline":
        st = vtprune.stats(model).as_dict()
        return {
            k: st[k]
            for k in (
                "visual_tokens_in",
                "visual_tokens_per_layer",
                "equivalent_tokens",
                "keep_ratio",
                "kv_cache_lengths",
                "overhead_s",
            )
        }
    ids = inputs["input_ids"]
    visual = torch.zeros_like(ids, dtype=torch.bool)
    for tid in adapter.visual_token_ids():
        visual |= ids == tid
    n_in = visual.sum(1).float().mean().item()
    return {
        "visual_tokens_in": n_in,
        "visual_tokens_per_layer": [n_in] * adapter.num_layers,
        "equivalent_tokens": n_in,
        "keep_ratio": 1.0,
        "kv_cache_lengths": [int(ids.shape[1])] * adapter.num_layers,
        "overhead_s": 0.0,
    }


def measure_plans(
    model, inputs: dict, plans: list[str], repeats: int = 5, warmup: int = 1, decode_tokens: int = 8
) -> dict[str, dict]:
    """Meters of every plan (``"baseline"`` = unpruned) on the same ``inputs``, timings interleaved.

    ``inputs`` is a processor output already on the model's device. Decode time per token is
    the mean gap between the ``decode_tokens`` generation steps of one ``generate`` call (the
    first new token comes out of the prefill itself), median over repeats; ``generate_s`` is
    that call end to end. The model is left unpruned.

    Example:
        >>> m = measure_plans(model, inputs, ["baseline", "pdrop:keep=0.25"], repeats=3)  # doctest: +SKIP
        >>> m["pdrop:keep=0.25"]["equivalent_tokens"], m["pdrop:keep=0.25"]["prefill_s"]  # doctest: +SKIP
        (36.0, 0.0123)
    """
    device = next(model.parameters()).device
    batch = int(inputs["input_ids"].shape[0])
    decode_tokens = max(2, decode_tokens)
    text_config = adapter_for(model).text_config
    out: dict[str, dict] = {}
    times: dict[str, dict[str, list[float]]] = {}
    for plan in plans:
        apply_plan(model, plan)
        flops, _ = count_flops(_prefill, model, inputs)
        acc = token_accounting(model, inputs, plan)
        recorded = vtprune.stats(model).tower_tokens_per_layer if plan != "baseline" else None
        acc.update(tower_accounting(model, inputs, recorded))
        peak, delta, kind = peak_memory(lambda: _prefill(model, inputs), device)
        for _ in range(warmup):
            _prefill(model, inputs)
            _generate(model, inputs, decode_tokens)
        out[plan] = {
            **acc,
            "flops_counted": flops / batch,
            "flops_formula": paper_flops(
                acc["visual_tokens_per_layer"], text_config.hidden_size, text_config.intermediate_size
            ),
            # per batch row: kv_cache_lengths are physical lengths (left padding included)
            "kv_cache_bytes": kv_cache_bytes(text_config, acc["kv_cache_lengths"], model.dtype),
            "peak_memory_bytes": peak,
            "peak_memory_delta_bytes": delta,
            "peak_memory_kind": kind,
        }
        times[plan] = {"prefill": [], "generate": [], "decode": [], "overhead": []}
    for _ in range(repeats):
        for plan in plans:
            apply_plan(model, plan, timing=True)
            times[plan]["prefill"].append(time_call(lambda: _prefill(model, inputs), device))
            if plan != "baseline":
                times[plan]["overhead"].append(vtprune.stats(model).overhead_s)
            clock = StepClock(device)
            times[plan]["generate"].append(
                time_call(lambda c=clock: _generate(model, inputs, decode_tokens, c), device)
            )
            times[plan]["decode"].append(clock.per_token())
    vtprune.remove(model)
    for plan in plans:
        t = times[plan]
        prefill, gen = statistics.median(t["prefill"]), statistics.median(t["generate"])
        overhead = statistics.median(t["overhead"]) if t["overhead"] else 0.0
        out[plan].update(
            prefill_s=prefill,
            generate_s=gen,
            decode_s_per_token=statistics.median(t["decode"]),
            overhead_s=overhead,
            overhead_share=overhead / prefill if prefill > 0 else 0.0,
            timer="cuda_events" if device.type == "cuda" else "perf_counter",
            repeats=repeats,
            warmup=warmup,
            decode_tokens=decode_tokens,
            batch=batch,
            threads=torch.get_num_threads(),
            omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", "default"),
            device=str(device),
            dtype=str(model.dtype).removeprefix("torch."),
        )
    return out
