"""One record per collective: what moved, over which group, how fast.

Bandwidths follow nccl-tests: ``algbw = bytes / time`` and ``busbw = algbw × factor`` with
factor ``2(n-1)/n`` for all-reduce, ``(n-1)/n`` for all-gather, reduce-scatter and
all-to-all, and 1 otherwise. On CUDA tensors the time comes from CUDA events that are read
only when records are asked for, so the hot path never synchronises. With no recorder
active, :func:`measure` returns a shared null context: recording costs nothing when off.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

_BUS_FACTORS = {
    "all_reduce": lambda n: 2 * (n - 1) / n,
    "all_gather": lambda n: (n - 1) / n,
    "reduce_scatter": lambda n: (n - 1) / n,
    "all_to_all": lambda n: (n - 1) / n,
}


@dataclass(frozen=True)
class CollectiveRecord:
    """One collective call. ``nbytes`` is the larger of its input and output buffers."""

    op: str
    group: str
    dtype: str
    nbytes: int
    group_size: int
    seconds: float

    @property
    def algbw(self) -> float:
        """Algorithm bandwidth in bytes per second."""
        return self.nbytes / self.seconds if self.seconds > 0 else 0.0

    @property
    def busbw(self) -> float:
        """Bus bandwidth in bytes per second (nccl-tests' definition)."""
        factor = _BUS_FACTORS.get(self.op, lambda n: 1.0)(self.group_size)
        return self.algbw * factor


@dataclass
class _Pending:
    op: str
    group: str
    dtype: str
    nbytes: int
    group_size: int
    start: torch.cuda.Event
    end: torch.cuda.Event


@dataclass(frozen=True)
class CollectiveSummary:
    """Records of one (group, op) pair added up."""

    group: str
    op: str
    calls: int
    nbytes: int
    seconds: float
    busbw: float

    def as_metrics(self, prefix: str = "comm") -> dict[str, float]:
        """``comm/<group>/<op>/{calls,bytes,time_ms,busbw_GBps}``."""
        key = f"{prefix}/{self.group}/{self.op}"
        return {
            f"{key}/calls": float(self.calls),
            f"{key}/bytes": float(self.nbytes),
            f"{key}/time_ms": self.seconds * 1e3,
            f"{key}/busbw_GBps": self.busbw / 1e9,
        }


class CollectiveRecorder:
    """Collects :class:`CollectiveRecord` objects while it is the active recorder."""

    def __init__(self) -> None:
        self._done: list[CollectiveRecord] = []
        self._pending: list[_Pending] = []

    @contextlib.contextmanager
    def _measure(
        self, op: str, group: str, tensor: torch.Tensor, nbytes: int, group_size: int
    ) -> Iterator[None]:
        dtype = str(tensor.dtype).removeprefix("torch.")
        if tensor.is_cuda:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._pending.append(_Pending(op, group, dtype, nbytes, group_size, start, end))
        else:
            begin = time.perf_counter()
            yield
            seconds = time.perf_counter() - begin
            self._done.append(CollectiveRecord(op, group, dtype, nbytes, group_size, seconds))

    def add(self, record: CollectiveRecord) -> None:
        """Add a record timed elsewhere (e.g. an asynchronous collective's future)."""
        self._done.append(record)

    def _resolve(self) -> None:
        for p in self._pending:
            p.end.synchronize()
            seconds = p.start.elapsed_time(p.end) / 1e3
            self._done.append(
                CollectiveRecord(p.op, p.group, p.dtype, p.nbytes, p.group_size, seconds)
            )
        self._pending.clear()

    @property
    def records(self) -> list[CollectiveRecord]:
        """All records so far (reads pending CUDA events, which may wait for the GPU)."""
        self._resolve()
        return list(self._done)

    def drain(self) -> list[CollectiveRecord]:
        """All records so far, forgetting them (one step's worth at a time)."""
        records = self.records
        self._done.clear()
        return records

    def clear(self) -> None:
        """Forget every record."""
        self._done.clear()
        self._pending.clear()


def summarize(records: list[CollectiveRecord]) -> list[CollectiveSummary]:
    """Records added up per (group, op); busbw is total bus bytes over total time."""
    totals: dict[tuple[str, str], list[float]] = {}
    for r in records:
        t = totals.setdefault((r.group, r.op), [0, 0, 0.0, 0.0])
        t[0] += 1
        t[1] += r.nbytes
        t[2] += r.seconds
        t[3] += r.busbw * r.seconds
    return [
        CollectiveSummary(group, op, int(c), int(b), s, bus / s if s > 0 else 0.0)
        for (group, op), (c, b, s, bus) in sorted(totals.items())
    ]


def format_summary(summaries: list[CollectiveSummary]) -> str:
    """A plain-text table of summaries, one row per (group, op)."""
    header = f"{'group':<8} {'op':<15} {'calls':>7} {'MiB':>10} {'time ms':>10} {'busbw GB/s':>11}"
    rows = [header, "-" * len(header)]
    for s in summaries:
        rows.append(
            f"{s.group:<8} {s.op:<15} {s.calls:>7} {s.nbytes / 2**20:>10.2f} "
            f"{s.seconds * 1e3:>10.2f} {s.busbw / 1e9:>11.3f}"
        )
    return "\n".join(rows)


_active: CollectiveRecorder | None = None
_OFF = contextlib.nullcontext()


def start_recording(recorder: CollectiveRecorder | None = None) -> CollectiveRecorder:
    """Make ``recorder`` (or a new one) receive every collective of this process."""
    global _active
    _active = recorder or CollectiveRecorder()
    return _active


def stop_recording() -> CollectiveRecorder | None:
    """Stop recording; returns the recorder that was active, if any."""
    global _active
    recorder, _active = _active, None
    return recorder


def active_recorder() -> CollectiveRecorder | None:
    """The recorder receiving collectives now, or ``None``."""
    return _active


def measure(
    op: str, group: str, tensor: torch.Tensor, group_size: int, nbytes: int | None = None
) -> contextlib.AbstractContextManager:
    """Context that times one collective into the active recorder (a no-op when off)."""
    if _active is None:
        return _OFF
    size = tensor.numel() * tensor.element_size() if nbytes is None else nbytes
    return _active._measure(op, group, tensor, size, group_size)
