"""GPU timing for the profiling scripts in this folder: the median time of a call, and
the device time per CUDA kernel of a torch.profiler run."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

import torch


def median_ms(fn: Callable[[], Any], repeats: int = 20, warmup: int = 3) -> float:
    """Median milliseconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones,
    each timed with CUDA events and waited for before the next."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def kernel_table(prof: Any, top: int, name_width: int = 100) -> list[str]:
    """A line of how busy the GPU was over the profiled span, then the ``top`` CUDA
    kernel names by total device time (ms, calls), slowest first."""
    events = [e for e in prof.events() if e.device_type.name == "CUDA"]
    if not events:
        return ["no CUDA kernels recorded"]
    busy = sum(e.device_time for e in events) / 1e3
    span = (max(e.time_range.end for e in events) - min(e.time_range.start for e in events)) / 1e3
    totals: dict[str, list[float]] = {}
    for e in events:
        totals.setdefault(e.name[:name_width], []).append(e.device_time / 1e3)
    rows = sorted(totals.items(), key=lambda kv: -sum(kv[1]))[:top]
    head = f"GPU busy {busy:.3f} ms of a {span:.3f} ms span, {len(events)} kernels"
    return [head] + [f"{sum(t):9.3f} ms {len(t):5d} {name}" for name, t in rows]
