"""Time the vtprune kernels against their PyTorch equivalents on a GPU and write a CSV.

Run ``python -m vtprune.kernels.bench [--out FILE.csv] [--quick] [--ops gather,scores,...]``.
For every case it first checks the Triton result against the reference (``max_abs_err``), then
reports the median / p20 / p80 time in ms, achieved GB/s and TFLOP/s, and their fraction of the
device peak when the device is in ``PEAKS`` (else absolute numbers only). Shapes follow
LLaVA-1.5/NeXT-7B (32 heads, head_dim 128, hidden 4096) with a GQA variant (8 KV heads).
Without a CUDA GPU it says so and exits 0. ``--smoke`` runs tiny shapes on CPU through the
Triton interpreter (set TRITON_INTERPRET=1) to check this script itself; its timings mean nothing.
"""

import argparse
import csv
import importlib.util
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

# (substring of torch.cuda.get_device_name(), HBM GB/s, dense bf16 tensor-core TFLOP/s); first match wins.
PEAKS = [
    ("H200", 4800.0, 989.0),
    ("H100 PCIe", 2000.0, 756.0),
    ("H100 NVL", 3900.0, 835.0),
    ("H100", 3350.0, 989.0),  # SXM5 (reported as "H100 80GB HBM3")
    ("A100-SXM4-80GB", 2039.0, 312.0),
    ("A100 80GB PCIe", 1935.0, 312.0),
    ("A100", 1555.0, 312.0),  # 40 GB parts
]


@dataclass
class Case:
    """One benchmark: ``impls`` maps a name to a zero-argument callable ("triton" is ours,
    "torch" the PyTorch baseline the speedup is relative to); ``reference`` gives the exact
    result the Triton output is checked against; bytes/flops give the achieved rates."""

    op: str
    name: str
    impls: dict[str, Callable[[], Any]]
    reference: Callable[[], Any]
    bytes: float = 0.0
    flops: float = 0.0


def _tensors(x) -> list[torch.Tensor]:
    return [x] if isinstance(x, torch.Tensor) else [t for item in x for t in _tensors(item)]


def _max_err(a, b) -> float:
    return max(float((x.float() - y.float()).abs().max()) for x, y in zip(_tensors(a), _tensors(b)))


def _randn(*shape, dev, dt):
    return torch.randn(*shape, device=dev, dtype=dt)


def _gather_cases(dev, dt, quick):
    from . import gather_rows, gather_rows_ref, gather_rows_rmsnorm, gather_rows_rmsnorm_ref

    b, length, n, hidden = (2, 7, 5, 16) if quick else (4, 2944, 1472, 4096)
    kv_heads, d = (2, 16) if quick else (8, 128)
    index = torch.sort(torch.randperm(length, device=dev)[:n]).values.expand(b, n).contiguous()
    x, w = _randn(b, length, hidden, dev=dev, dt=dt), _randn(hidden, dev=dev, dt=dt)
    cos, sin = _randn(1, length, d, dev=dev, dt=dt), _randn(1, length, d, dev=dev, dt=dt)
    k, v = _randn(b, kv_heads, length, d, dev=dev, dt=dt), _randn(b, kv_heads, length, d, dev=dev, dt=dt)

    def torch_gather(t):  # what a user writes: torch.gather with an expanded index
        t = t.expand(b, *t.shape[1:])
        i = index[:, :, None].expand(-1, -1, t.shape[-1])
        return t.gather(1, i) if t.dim() == 3 else t.gather(2, i[:, None].expand(-1, t.shape[1], -1, -1))

    def torch_rmsnorm():
        g = torch_gather(x)
        f = g.float()
        return g, w * (f * torch.rsqrt(f.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dt)

    size = x.element_size()
    return [
        Case(
            "gather_rows",
            f"hidden+cos+sin B{b} L{length} N{n}",
            {
                "triton": lambda: gather_rows([x, cos, sin], index),
                "torch": lambda: [torch_gather(t) for t in (x, cos, sin)],
            },
            lambda: gather_rows_ref([x, cos, sin], index),
            bytes=2 * b * n * (hidden + 2 * d) * size,
        ),
        Case(
            "gather_rows",
            f"kv B{b} Hkv{kv_heads} L{length} N{n}",
            {
                "triton": lambda: gather_rows([k, v], index),
                "torch": lambda: [torch_gather(k), torch_gather(v)],
            },
            lambda: gather_rows_ref([k, v], index),
            bytes=2 * 2 * b * kv_heads * n * d * size,
        ),
        Case(
            "gather_rows_rmsnorm",
            f"B{b} L{length} N{n} D{hidden}",
            {"triton": lambda: gather_rows_rmsnorm(x, index, w, 1e-6), "torch": torch_rmsnorm},
            lambda: gather_rows_rmsnorm_ref(x, index, w, 1e-6),
            bytes=3 * b * n * hidden * size,
        ),
    ]


def _attn_shapes(quick):
    return (1, 4, 2, 40, 16) if quick else (1, 32, 8, 2944, 128)  # B, H, H_kv, L, D


def _score_cases(dev, dt, quick):
    from . import key_attention_colsum, key_attention_colsum_ref, query_key_probs, query_key_probs_ref

    b, h, h_kv, length, d = _attn_shapes(quick)
    key_valid = torch.ones(b, length, dtype=torch.bool, device=dev)
    k = _randn(b, h_kv, length, d, dev=dev, dt=dt)
    cases = []
    for nq in (1, 8 if quick else 64):  # the last token (FastV) or the text tokens (PyramidDrop)
        q = _randn(b, h, nq, d, dev=dev, dt=dt)
        args = (
            q,
            k,
            key_valid,
            torch.arange(length - nq, length, device=dev).expand(b, nq),
            d**-0.5,
            (4, length - nq),
        )
        cases.append(
            Case(
                "query_key_probs",
                f"B{b} H{h}/{h_kv} Q{nq} L{length}",
                {
                    "triton": lambda a=args: query_key_probs(*a),
                    "torch": lambda a=args: query_key_probs_ref(*a),
                },
                lambda a=args: query_key_probs_ref(*a),
                bytes=2 * k.numel() * k.element_size(),  # K is read by both passes
                flops=2 * 2 * b * h * nq * length * d,
            )
        )
    q = _randn(b, h, length, d, dev=dev, dt=dt)
    cases.append(
        Case(
            "key_attention_colsum",
            f"B{b} H{h}/{h_kv} L{length}",
            {
                "triton": lambda: key_attention_colsum(q, k, key_valid, None, d**-0.5),
                "torch": lambda: key_attention_colsum_ref(q, k, key_valid, key_valid, d**-0.5),
            },
            lambda: key_attention_colsum_ref(q, k, key_valid, key_valid, d**-0.5),
            bytes=2 * (q.numel() + k.numel()) * q.element_size(),
            flops=2 * 2 * b * h * length * length * d / 2,  # two causal QK^T passes
        )
    )
    return cases


def _varlen_cases(dev, dt, quick):
    from . import varlen_attention, varlen_attention_ref

    _, h, h_kv, _, d = _attn_shapes(quick)
    lens = [5, 17, 9] if quick else [700, 1500, 2944, 1200]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], device=dev, dtype=torch.int32)
    q, k, v = (_randn(sum(lens), heads, d, dev=dev, dt=dt) for heads in (h, h_kv, h_kv))

    def torch_loop():  # SDPA per sequence in the model dtype
        out = torch.empty_like(q)
        for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
            qs, ks, vs = (t[s:e].transpose(0, 1)[None] for t in (q, k, v))
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=d**-0.5, enable_gqa=True)
            out[s:e] = o[0].transpose(0, 1)
        return out

    impls = {"triton": lambda: varlen_attention(q, k, v, cu, d**-0.5, True, max(lens)), "torch": torch_loop}
    if dev.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        from flash_attn import flash_attn_varlen_func

        impls["flash_attn"] = lambda: flash_attn_varlen_func(
            q, k, v, cu, cu, max(lens), max(lens), causal=True
        )
    return [
        Case(
            "varlen_attention",
            f"H{h}/{h_kv} lens{lens}",
            impls,
            lambda: varlen_attention_ref(q, k, v, cu, d**-0.5),
            bytes=(2 * q.numel() + k.numel() + v.numel()) * q.element_size(),
            flops=sum(4 * n * n * d * h / 2 for n in lens),
        )
    ]


def _visual_cases(dev, dt, quick):
    from . import (
        head_masked_attention,
        head_masked_attention_ref,
        visual_window_attention,
        visual_window_attention_ref,
    )
    from .visual_attention import _visual_mask_ref

    _, h, h_kv, _, d = _attn_shapes(quick)
    side, text, window = (4, 3, 3) if quick else (48, 64, 5)
    length = text + side * side + text
    q, k, v = (_randn(1, heads, length, d, dev=dev, dt=dt) for heads in (h, h_kv, h_kv))
    start = torch.tensor([text], device=dev)
    heads_on = torch.arange(h, device=dev) % 2 == 0
    window_args = (q, k, v, text, side, side, window, d**-0.5)
    head_args = (q, k, v, text, side * side, heads_on, d**-0.5)
    specs = [  # op, ours, reference, the same mask for the SDPA baseline
        ("visual_window_attention", visual_window_attention, visual_window_attention_ref, window_args,
         _visual_mask_ref(length, length, start, side * side, None, side, window // 2, start)),
        ("head_masked_attention", head_masked_attention, head_masked_attention_ref, head_args,
         _visual_mask_ref(length, length, start, side * side, None, head_mask=heads_on)),
    ]  # fmt: skip
    cases = []
    for op, fn, ref, args, mask in specs:

        def sdpa(m=mask):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=d**-0.5, enable_gqa=True)

        cases.append(
            Case(
                op,
                f"H{h}/{h_kv} grid{side}x{side} L{length}",
                {"triton": lambda f=fn, a=args: f(*a), "torch": sdpa},
                lambda r=ref, a=args: r(*a),
                bytes=4 * q.numel() * q.element_size(),
                flops=4 * d * float(mask.expand(1, h, length, length).sum()),  # visible pairs only
            )
        )
    return cases


SUITES = {"gather": _gather_cases, "scores": _score_cases, "varlen": _varlen_cases, "visual": _visual_cases}


def _time_ms(fn, dev, flush) -> list[float]:
    """Median, p20, p80 in ms; the L2 cache is flushed before each repetition."""
    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    fn()
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    reps = max(5, min(100, int(0.2 / max(time.perf_counter() - t0, 1e-6))))  # about 0.2 s per case
    times = []
    for _ in range(reps):
        flush.zero_()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    t = torch.tensor(times)
    return [float(t.quantile(x)) for x in (0.5, 0.2, 0.8)]


def _peaks(dev):
    if dev.type != "cuda":
        return None
    name = torch.cuda.get_device_name(dev)
    return next(((bw, fl) for key, bw, fl in PEAKS if key in name), None)


def run(out: str, quick: bool, ops: list[str], dev: torch.device) -> list[dict]:
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    peaks = _peaks(dev)
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (interpreter)"
    flush = torch.empty(256 * 2**20 if dev.type == "cuda" else 1, dtype=torch.int8, device=dev)
    rows = []
    for suite in ops:
        for case in SUITES[suite](dev, dt, quick):
            err = _max_err(case.impls["triton"](), case.reference())
            timed = {impl: _time_ms(fn, dev, flush) for impl, fn in case.impls.items()}
            for impl, (med, p20, p80) in timed.items():
                gbps, tflops = case.bytes / med / 1e6, case.flops / med / 1e9
                rows.append(
                    dict(
                        op=case.op,
                        case=case.name,
                        impl=impl,
                        device=device_name,
                        median_ms=med,
                        p20_ms=p20,
                        p80_ms=p80,
                        gbps=gbps,
                        tflops=tflops,
                        frac_peak_bw=gbps / peaks[0] if peaks else "",
                        frac_peak_flops=tflops / peaks[1] if peaks and case.flops else "",
                        speedup_vs_torch=timed["torch"][0] / med,
                        max_abs_err_vs_ref=err if impl == "triton" else "",
                    )
                )
                print(
                    f"{case.op:24s} {case.name:34s} {impl:10s} {med:9.3f} ms {gbps:8.1f} GB/s {tflops:7.2f} TFLOP/s"
                )
            print(f"{'':24s} {'':34s} triton max |err| vs reference: {err:.3g}")
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {len(rows)} rows to {out}")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="vtprune_kernels_bench.csv", help="CSV file to write")
    parser.add_argument("--quick", action="store_true", help="small shapes")
    parser.add_argument("--ops", default=",".join(SUITES), help=f"comma-separated subset of {list(SUITES)}")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny CPU run through TRITON_INTERPRET=1 (tests this script)"
    )
    args = parser.parse_args(argv)
    ops = [o for o in args.ops.split(",") if o]
    unknown = sorted(set(ops) - set(SUITES))
    if unknown:
        parser.error(f"unknown --ops {unknown}; choose from {list(SUITES)}")
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            parser.error("--smoke needs TRITON_INTERPRET=1 in the environment")
        previous = os.environ.get("VTPRUNE_KERNELS")
        os.environ["VTPRUNE_KERNELS"] = "triton"  # CPU tensors would otherwise take the reference
        try:
            run(args.out, True, ops, torch.device("cpu"))
        finally:
            if previous is None:
                del os.environ["VTPRUNE_KERNELS"]
            else:
                os.environ["VTPRUNE_KERNELS"] = previous
        return 0
    if not torch.cuda.is_available():
        print("No CUDA GPU available: nothing to benchmark (the kernels only run on CUDA).")
        return 0
    if importlib.util.find_spec("triton") is None:
        print("Triton is not installed: nothing to benchmark.")
        return 0
    run(args.out, args.quick, ops, torch.device("cuda"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
