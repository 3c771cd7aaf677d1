"""What every benchmark suite shares: settings, sizes, timers, statistics, a step's GPU
peak, host facts, layouts inside Executor workers, and plain-text tables."""

from __future__ import annotations

import datetime
import os
import platform
import re
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
    "fp64": torch.float64,
}


@dataclass(frozen=True)
class Common:
    """Settings every suite receives: the device kind (``cpu`` or ``cuda``), timed
    repetitions per measurement after ``warmup`` untimed ones, and how many times the
    whole measurement is repeated (``runs``; headlines are medians over runs)."""

    device: str = "cpu"
    repeats: int = 20
    warmup: int = 3
    runs: int = 3

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"


def check_world(suite: str, world: int) -> None:
    """Comparisons need at least two processes (a group of one communicates nothing)."""
    if world < 2:
        raise ValueError(f"{suite}.world must be at least 2, got {world}")


def check_choices(what: str, values: Iterable[str], choices: Iterable[str]) -> None:
    """A ``ValueError`` naming the choices for the first of ``values`` not among them."""
    known = list(choices)
    for value in values:
        if value not in known:
            raise ValueError(f"unknown {what} {value!r}; choose from {known}")


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda, but no CUDA GPU is visible; use device=cpu")
    return device


def parse_bytes(value: int | str) -> int:
    """``1024``, ``"1KiB"``, ``"16 MiB"``, ``"1G"`` -> bytes (binary units)."""
    if isinstance(value, int):
        return value
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", str(value).lower())
    if not match:
        raise ValueError(f"not a size: {value!r} (write e.g. 4096, 1KiB, 16MiB, 1GiB)")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def format_bytes(nbytes: float) -> str:
    """``16777216`` -> ``16 MiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(nbytes) < 1024 or unit == "GiB":
            return f"{nbytes:g} {unit}" if unit == "B" else f"{nbytes:.4g} {unit}"
        nbytes /= 1024
    raise AssertionError("unreachable")


def format_seconds(seconds: float) -> str:
    """Seconds in the unit that keeps three or four digits."""
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.3f} s"


def geometric_sizes(low: int | str, high: int | str, factor: int = 2) -> list[int]:
    """``low, low·factor, ...`` up to ``high`` (inclusive); sizes in bytes or as
    :func:`parse_bytes` reads them (``"64KiB"``)."""
    low, high = parse_bytes(low), parse_bytes(high)
    if low < 1 or high < low or factor < 2:
        raise ValueError(f"need 1 <= low <= high and factor >= 2, got {low}, {high}, {factor}")
    sizes, size = [], low
    while size <= high:
        sizes.append(size)
        size *= factor
    return sizes


def torch_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(_DTYPES)}") from None


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def rank_max(per_rank: Sequence[Sequence[float]]) -> list[float]:
    """Per-iteration time of a collective step: the slowest rank of each iteration."""
    return [max(times) for times in zip(*per_rank, strict=True)]


def slowest_rank_stats(
    per_run: Sequence[Sequence[Any]], times: Callable[[Any], Sequence[float]]
) -> dict[str, Any]:
    """:func:`run_stats` of ``runs × ranks`` results, each iteration timed by its slowest
    rank (``times(rank result)``: that rank's per-iteration times)."""
    return run_stats([rank_max([times(rank) for rank in run]) for run in per_run])


def run_stats(run_times: Sequence[Sequence[float]]) -> dict[str, Any]:
    """Headline over runs: the median of each run's median, plus the per-run medians and
    the spread (10th/90th percentile) over every iteration."""
    medians = [median(times) for times in run_times]
    every = sorted(t for times in run_times for t in times)
    return {
        "median_s": median(medians),
        "run_medians_s": medians,
        "p10_s": every[len(every) // 10],
        "p90_s": every[(len(every) * 9) // 10],
    }


def paired_ratio(numerators: Sequence[float], denominators: Sequence[float]) -> dict[str, Any]:
    """Median over runs of each run's ``numerator / denominator`` (both measured in the
    same run), with the per-run ratios."""
    ratios = [
        n / d if d > 0 else float("nan") for n, d in zip(numerators, denominators, strict=True)
    ]
    return {"ratio": median(ratios), "run_ratios": ratios}


# Timing -------------------------------------------------------------------------------


def synchronize(device: torch.device | str) -> None:
    """Wait for queued GPU work (nothing on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class IterationTimer:
    """Times calls one by one: wall clock on CPU (plus the process's CPU time, which
    leaves out time spent waiting for the cores or for other ranks); CUDA events on GPU,
    read only at :meth:`seconds`, so the timed loop never waits for the GPU."""

    def __init__(self, device: torch.device | str) -> None:
        self.cuda = torch.device(device).type == "cuda"
        self._wall: list[float] = []
        self._cpu: list[float] = []
        self._events: list[tuple[Any, Any]] = []

    def time(self, fn: Callable[[], Any]) -> Any:
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            result = fn()
            end.record()
            self._events.append((start, end))
            return result
        begin, begin_cpu = time.perf_counter(), time.process_time()
        result = fn()
        self._cpu.append(time.process_time() - begin_cpu)
        self._wall.append(time.perf_counter() - begin)
        return result

    def seconds(self) -> list[float]:
        """Every timed call's duration, in order."""
        if self.cuda:
            if self._events:
                self._events[-1][1].synchronize()
            return [s.elapsed_time(e) / 1e3 for s, e in self._events]
        return list(self._wall)

    def cpu_seconds(self) -> list[float] | None:
        """Every timed call's process CPU time (``None`` on CUDA)."""
        return None if self.cuda else list(self._cpu)


# Layouts inside workers ---------------------------------------------------------------


def peak_bytes(model: Any, step: Callable[[], Any], device: torch.device) -> int | None:
    """The model's weights plus the peak of one ``step()`` above what was allocated before
    it (CUDA; ``None`` elsewhere). A first step allocates the gradients, as in training."""
    if device.type != "cuda":
        return None
    step()
    model.zero_grad(set_to_none=True)
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    synchronize(device)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    model.zero_grad(set_to_none=True)
    return torch.cuda.max_memory_allocated(device) - before + weights


def use_layout(**sizes: int) -> Any:
    """Inside an Executor worker: make the parallel layout ``sizes`` (``tp=2``, ``sp=2``,
    ``ulysses=2, ring=2``...) current, rebuilding the groups if another one is."""
    import torch.distributed as dist

    from vidpar.config import ParallelConfig
    from vidpar.distributed import state as ps

    parallel = ParallelConfig(**sizes).resolve(dist.get_world_size())
    if ps.model_parallel_is_initialized():
        if ps.get_parallel_config() == parallel:
            return ps.get_parallel_state()
        ps.destroy_model_parallel()
    return ps.initialize_model_parallel(parallel)


# Host and reports ---------------------------------------------------------------------


def load_average() -> list[float] | None:
    """The 1/5/15-minute load averages (other processes compete for the cores)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def host_info(device: str) -> dict[str, Any]:
    """Machine, software and load, for the report."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": _cpu_model(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": device,
        "load_average": load_average(),
    }
    if device == "cuda":
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["cuda"] = torch.version.cuda
        info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """A left/right aligned text table of ``rows``; ``columns`` are ``(key, header)`` and
    values are printed as they are (format them before)."""
    cells = [[str(row.get(key, "")) for key, _ in columns] for row in rows]
    headers = [header for _, header in columns]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    left = [not all(_numeric(c[i]) for c in cells) for i in range(len(columns))]

    def line(values: Sequence[str]) -> str:
        return "  ".join(
            v.ljust(w) if lft else v.rjust(w)
            for v, w, lft in zip(values, widths, left, strict=True)
        ).rstrip()

    out = [line(headers), "  ".join("-" * w for w in widths)]
    out += [line(c) for c in cells]
    return "\n".join(out)


_NUMBER = re.compile(
    r"[-+]?\d[\d.]*(e[-+]?\d+)?x?( ?(%|ns|us|ms|s|B|KiB|MiB|GiB|GB/s)( / .*)?)?|-|nan|"
)


def _numeric(text: str) -> bool:
    """A number, perhaps with a unit (right-aligned in tables)."""
    return bool(_NUMBER.fullmatch(text.strip()))


# One process against a parallel layout -------------------------------------------------


def interleaved_runs(
    single_fn: Callable[[], Any] | None,
    parallel_fn: Callable[[], Any],
    group: Any,
    device: torch.device | str,
    common: Common,
) -> dict[str, list[list[float]]]:
    """Inside every worker of ``group`` (a GroupCoordinator): per run, ``warmup + repeats``
    iterations of ``single_fn`` (on the rank that passes one; the others wait) followed by
    ``parallel_fn`` on every rank, separated by barriers. Returns this rank's timed
    seconds, runs × iterations: ``single`` (empty without one), ``parallel`` and, on CPU,
    their process CPU times ``single_cpu`` and ``parallel_cpu``."""
    out: dict[str, list[list[float]]] = {}
    for _ in range(common.runs):
        single_timer, parallel_timer = IterationTimer(device), IterationTimer(device)
        for i in range(common.warmup + common.repeats):
            timed = i >= common.warmup
            if single_fn is not None:
                _maybe_time(single_timer, timed, single_fn)
            synchronize(device)
            group.barrier()
            _maybe_time(parallel_timer, timed, parallel_fn)
            synchronize(device)
            group.barrier()
        for key, timer in (("single", single_timer), ("parallel", parallel_timer)):
            out.setdefault(key, []).append(timer.seconds())
            cpu = timer.cpu_seconds()
            if cpu is not None:
                out.setdefault(f"{key}_cpu", []).append(cpu)
    return out


def _maybe_time(timer: IterationTimer, timed: bool, fn: Callable[[], Any]) -> None:
    if timed:
        timer.time(fn)
    else:
        fn()


def summarise_speedup(
    per_rank: Sequence[dict[str, Any]], passes: Sequence[str], row: dict[str, Any]
) -> dict[str, Any]:
    """Fold what :func:`interleaved_runs` gave every rank (``per_rank[r][pass]`` holds
    ``single`` and ``parallel``) into ``row``: headline times and the speedup per pass.
    ``max_abs_diff``/``max_abs_ref`` are taken from rank 0."""
    row["max_abs_diff"] = per_rank[0].get("max_abs_diff")
    row["max_abs_ref"] = per_rank[0].get("max_abs_ref")
    for pass_name in passes:
        single = per_rank[0][pass_name]["single"]
        parallel = [
            rank_max([r[pass_name]["parallel"][i] for r in per_rank]) for i in range(len(single))
        ]
        s, p = run_stats(single), run_stats(parallel)
        ratio = paired_ratio(s["run_medians_s"], p["run_medians_s"])
        row[pass_name] = {
            "single": s,
            "parallel": p,
            "speedup": ratio["ratio"],
            "run_speedups": ratio["run_ratios"],
        }
        if "single_cpu" in per_rank[0][pass_name]:
            # CPU time of the busiest rank per iteration: the work on the critical path,
            # without the time spent waiting for a core (other processes) or for a peer.
            single_cpu = per_rank[0][pass_name]["single_cpu"]
            parallel_cpu = [
                rank_max([r[pass_name]["parallel_cpu"][i] for r in per_rank])
                for i in range(len(single_cpu))
            ]
            sc, pc = run_stats(single_cpu), run_stats(parallel_cpu)
            row[pass_name]["single_cpu_s"] = sc["median_s"]
            row[pass_name]["parallel_cpu_s"] = pc["median_s"]
            row[pass_name]["cpu_time_speedup"] = paired_ratio(
                sc["run_medians_s"], pc["run_medians_s"]
            )["ratio"]
    return row


def speedup_table(results: Sequence[dict[str, Any]]) -> str:
    """Rows of :func:`summarise_speedup`: mode, pass, both times, speedup, output check."""
    rows = []
    for r in results:
        for pass_name in ("forward", "backward"):
            if pass_name not in r:
                continue
            m = r[pass_name]
            rows.append(
                {
                    "mode": r["mode"],
                    "pass": "fwd" if pass_name == "forward" else "fwd+bwd",
                    "single": format_seconds(m["single"]["median_s"]),
                    "parallel": format_seconds(m["parallel"]["median_s"]),
                    "speedup": f"{m['speedup']:.2f}x",
                    "cpu": f"{m['cpu_time_speedup']:.2f}x" if "cpu_time_speedup" in m else "",
                    "diff": "" if r["max_abs_diff"] is None else f"{r['max_abs_diff']:.1e}",
                }
            )
    columns = [
        ("mode", "mode"),
        ("pass", "pass"),
        ("single", "1 process"),
        ("parallel", "parallel"),
        ("speedup", "speedup"),
        ("cpu", "cpu-time speedup"),
        ("diff", "max |diff| vs 1 process"),
    ]
    if not any(row["cpu"] for row in rows):
        columns.remove(("cpu", "cpu-time speedup"))
    return format_table(rows, columns)
