"""Clocks and memory probes for the efficiency meters: CUDA events on a GPU, monotonic clocks on a CPU."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds one call of ``fn`` takes: CUDA events on a GPU, ``perf_counter`` on a CPU.

    Example:
        >>> time_call(lambda: sum(range(1000)), torch.device("cpu")) > 0
        True
    """
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        _sync(device)
        start.record()
        fn()
        end.record()
        _sync(device)  # elapsed_time is only valid once both events completed
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:  # second field: resident pages
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_memory(fn: Callable[[], object], device: torch.device) -> tuple[int, int, str]:
    """(peak bytes, peak minus bytes before the call, how it was measured) for one call of ``fn``.

    GPU: ``torch.cuda.max_memory_allocated`` (tensors only). CPU: resident set size of the whole
    process sampled every millisecond by a thread (``/proc/self/statm``), because no allocator
    statistic exists for CPU tensors and ``tracemalloc`` does not see them; the delta can be 0
    when the allocator reuses pages freed by earlier calls. Elsewhere: ``ru_maxrss`` (lifetime).

    Example:
        >>> peak, delta, kind = peak_memory(lambda: torch.ones(1 << 20), torch.device("cpu"))
        >>> peak > 0 and delta >= 0
        True
    """
    if device.type == "cuda":
        _sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device)
        return peak, peak - before, "cuda_max_memory_allocated"
    if not os.path.exists("/proc/self/statm"):
        import resource

        fn()
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, 0, "cpu_ru_maxrss_lifetime"
    before = peak = _rss_bytes()
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss_bytes())
            done.wait(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        fn()
    finally:
        done.set()
        sampler.join()
    peak = max(peak, _rss_bytes())
    return peak, peak - before, "cpu_rss_sampled"


class StepClock:
    """Logits processor stamping the time of every generation step (after a device sync).

    Step ``i`` ends when its logits reach the processor, so the gaps between stamps are the
    decode steps themselves, free of the prefill's noise (``generate - prefill`` of two noisy
    medians can even come out negative on a busy CPU).
    """

    def __init__(self, device: torch.device):
        self.device, self.stamps = device, []

    def __call__(self, input_ids, scores):
        _sync(self.device)
        self.stamps.append(time.perf_counter())
        return scores

    def per_token(self) -> float:
        return (self.stamps[-1] - self.stamps[0]) / max(1, len(self.stamps) - 1)
