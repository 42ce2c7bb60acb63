"""Latency measurement: median and p20/p80 of one call, after warm-up.

* **CUDA**: one pair of CUDA events around every call, all recorded on the current
  stream and read after a single ``torch.cuda.synchronize`` at the end; before every
  call the L2 cache is flushed by zeroing a buffer of twice the L2 size (at least
  64 MiB, outside the timed region), so every call reads its inputs from HBM as it
  would inside a model. The time therefore includes the host-side launch cost of the
  call only where it exceeds the GPU work of the previous call (launches are queued
  behind the flush).
* **CPU**: ``time.perf_counter`` around every call (CPU ops are synchronous).

The number of timed calls adapts to the call's cost: enough to fill ``budget_s``
seconds, within ``[min_repeats, max_repeats]``. :class:`Timing.method` names what
was done, and the reports print it.

This is the project's one clock: the tuner (``mhc_kernels.autotune.engine.CudaTimer``)
times its candidates with :func:`samples`, so it picks configs by the same measurement
the benchmark reports.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch


@dataclass
class Timing:
    median_s: float
    p20_s: float
    p80_s: float
    repeats: int
    warmup: int
    method: str

    def to_dict(self) -> dict:
        return asdict(self)


def percentile(sorted_xs: list[float], q: float) -> float:
    """Linear-interpolated percentile of an ascending list, ``q`` in [0, 100]."""
    if not sorted_xs:
        return math.nan
    pos = (len(sorted_xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def summarise(times: list[float], warmup: int, method: str) -> Timing:
    xs = sorted(times)
    return Timing(percentile(xs, 50), percentile(xs, 20), percentile(xs, 80), len(xs), warmup, method)


_FLUSH: dict = {}


def _flush_buffer(device: torch.device) -> torch.Tensor:
    key = (device.type, device.index)
    if key not in _FLUSH:
        idx = device.index if device.index is not None else torch.cuda.current_device()
        l2 = getattr(torch.cuda.get_device_properties(idx), "L2_cache_size", 0) or (50 << 20)
        _FLUSH[key] = torch.empty(max(2 * l2, 64 << 20) // 4, dtype=torch.int32, device=device)
    return _FLUSH[key]


def method_name(device: torch.device) -> str:
    if device.type == "cuda":
        return "cuda-events per call, L2 flushed before each call (memset of 2x L2), median/p20/p80"
    return "wall clock (time.perf_counter) per call, median/p20/p80"


def samples(fn: Callable[[], object], device: torch.device | str, repeats: int) -> list[float]:
    """``repeats`` timed calls of ``fn()`` on ``device`` (seconds each; see the module docstring), no warm-up."""
    device = torch.device(device)
    if device.type != "cuda":
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return times
    flush = _flush_buffer(device)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    torch.cuda.synchronize(device)
    for s, e in zip(starts, ends):
        flush.zero_()
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize(device)
    return [s.elapsed_time(e) * 1e-3 for s, e in zip(starts, ends)]


def time_fn(fn: Callable[[], object], device: torch.device | str, *, warmup: int = 2, min_repeats: int = 5,
            max_repeats: int = 100, budget_s: float = 0.3, max_warmup_s: Optional[float] = None) -> Timing:
    """Time ``fn()`` (no arguments; its result is discarded) on ``device``."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    # warm-up; the last warm-up call estimates the cost of one call (the first may compile)
    t_start = time.perf_counter()
    n_warm = 0
    per_call = 0.0
    for _ in range(max(1, warmup)):
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize(device)
        per_call = time.perf_counter() - t0
        n_warm += 1
        if max_warmup_s is not None and time.perf_counter() - t_start > max_warmup_s:
            break
    repeats = int(min(max_repeats, max(min_repeats, budget_s / max(per_call, 1e-7))))
    return summarise(samples(fn, device, repeats), n_warm, method_name(device))
