"""``collectives``: latency and bandwidth of vidpar's GroupCoordinator against the same
operation through raw ``torch.distributed``, on the same tensors in the same run.

Sizes follow nccl-tests: the size of all_reduce is its buffer, of all_gather its output,
of reduce_scatter its input and of all_to_all its (equal) input and output; ``algbw =
size / time`` and ``busbw = algbw × factor`` (2(n-1)/n for all_reduce, (n-1)/n for the
others), computed by :class:`~vidpar.distributed.telemetry.CollectiveRecord`. In each
iteration vidpar's call and the raw call run back to back (which goes first alternates),
so both see the same load; an iteration's time is its slowest rank's, and latency is the
median over iterations.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from vidpar.benchmarks.common import (
    Common,
    IterationTimer,
    check_choices,
    check_world,
    format_bytes,
    format_seconds,
    format_table,
    geometric_sizes,
    host_info,
    median,
    paired_ratio,
    slowest_rank_stats,
    synchronize,
    torch_dtype,
)
from vidpar.distributed.telemetry import CollectiveRecord

OPS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all")
# The flat-buffer collectives (renamed in torch 2.13), as vidpar's communicator calls them.
_all_gather_flat = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)


@dataclass
class CollectivesOptions:
    """``world`` processes; sizes from ``min_bytes`` to ``max_bytes`` (null: 16 MiB on CPU,
    1 GiB on CUDA) multiplying by ``factor``; ``plot``: a PNG of busbw against size."""

    world: int = 2
    ops: list[str] = field(default_factory=lambda: list(OPS))
    min_bytes: Any = "1KiB"
    max_bytes: Any = None
    factor: int = 2
    dtype: str = "float32"
    plot: str | None = None


def sizes_for(options: CollectivesOptions, common: Common) -> list[int]:
    high = options.max_bytes or ("1GiB" if common.cuda else "16MiB")
    return geometric_sizes(options.min_bytes, high, options.factor)


def _make_ops(
    op: str, nbytes: int, dtype: torch.dtype, device: torch.device
) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """(vidpar call, raw torch.distributed call) for one op and size, sharing tensors."""
    from vidpar.distributed import state as ps

    coord = ps.get_world_group()
    group, n = coord.device_group, coord.world_size
    numel = max(n, nbytes // torch.empty((), dtype=dtype).element_size() // n * n)
    if op == "all_reduce":
        x = torch.zeros(numel, dtype=dtype, device=device)
        return (lambda: coord.all_reduce(x)), (lambda: dist.all_reduce(x, group=group))
    if op == "all_gather":
        x = torch.zeros(numel // n, dtype=dtype, device=device)
        out = torch.empty(numel, dtype=dtype, device=device)
        return (lambda: coord.all_gather(x, 0)), (lambda: _all_gather_flat(out, x, group=group))
    if op == "reduce_scatter":
        x = torch.zeros(numel, dtype=dtype, device=device)
        out = torch.empty(numel // n, dtype=dtype, device=device)
        return (
            (lambda: coord.reduce_scatter(x, 0)),
            (lambda: _reduce_scatter_flat(out, x, group=group)),
        )
    if op == "all_to_all":
        x = torch.zeros(numel, dtype=dtype, device=device)
        out = torch.empty_like(x)
        return (
            (lambda: coord.all_to_all(x, 0, 0)),
            (lambda: dist.all_to_all_single(out, x, group=group)),
        )
    raise ValueError(f"unknown collective {op!r}; choose from {OPS}")


def _worker_sweep(
    worker, sizes: list[int], ops: list[str], dtype_name: str, common: Common
) -> list[dict[str, Any]]:
    """In each worker: every (size, op) of one run; per-iteration times of both paths."""
    from vidpar.distributed import state as ps

    device, dtype = worker.device, torch_dtype(dtype_name)
    coord = ps.get_world_group()
    out = []
    for nbytes in sizes:
        for op in ops:
            vidpar_fn, raw_fn = _make_ops(op, nbytes, dtype, device)
            for _ in range(common.warmup):
                vidpar_fn()
                raw_fn()
            synchronize(device)
            coord.barrier()
            vidpar_timer, raw_timer = IterationTimer(device), IterationTimer(device)
            for i in range(common.repeats):
                # Alternate which goes first: the first call of a pair absorbs the ranks'
                # arrival skew.
                if i % 2:
                    raw_timer.time(raw_fn)
                    vidpar_timer.time(vidpar_fn)
                else:
                    vidpar_timer.time(vidpar_fn)
                    raw_timer.time(raw_fn)
            out.append(
                {
                    "op": op,
                    "bytes": nbytes,
                    "vidpar": vidpar_timer.seconds(),
                    "raw": raw_timer.seconds(),
                }
            )
            synchronize(device)
    return out


def run(options: CollectivesOptions, common: Common) -> dict[str, Any]:
    """Sweep sizes × ops ``common.runs`` times in one world of ``options.world`` workers."""
    from vidpar.config import ParallelConfig
    from vidpar.executor import Executor

    check_world("collectives", options.world)
    check_choices("collective", options.ops, OPS)
    sizes = sizes_for(options, common)
    per_run = []
    with Executor(ParallelConfig(dp=options.world), devices=common.device) as ex:
        for _ in range(common.runs):
            per_run.append(
                ex.collective_rpc(_worker_sweep, sizes, options.ops, options.dtype, common)
            )
    rows = []
    for index, first in enumerate(per_run[0][0]):
        op, nbytes = first["op"], first["bytes"]
        v = slowest_rank_stats(per_run, lambda rank, i=index: rank[i]["vidpar"])
        r = slowest_rank_stats(per_run, lambda rank, i=index: rank[i]["raw"])
        ratio = paired_ratio(v["run_medians_s"], r["run_medians_s"])
        row = {"op": op, "bytes": nbytes, "world": options.world}
        for name, stats in (("vidpar", v), ("raw", r)):
            record = CollectiveRecord(
                op, "world", options.dtype, nbytes, options.world, stats["median_s"]
            )
            row[name] = {
                **stats,
                "algbw_GBps": record.algbw / 1e9,
                "busbw_GBps": record.busbw / 1e9,
            }
        row["time_ratio_vidpar_over_raw"] = ratio["ratio"]
        row["run_time_ratios"] = ratio["run_ratios"]
        rows.append(row)
    summary = {
        op: {
            "median_time_ratio": median(
                [r["time_ratio_vidpar_over_raw"] for r in rows if r["op"] == op]
            ),
            "peak_busbw_GBps_vidpar": max(r["vidpar"]["busbw_GBps"] for r in rows if r["op"] == op),
            "peak_busbw_GBps_raw": max(r["raw"]["busbw_GBps"] for r in rows if r["op"] == op),
        }
        for op in options.ops
    }
    report = {
        "results": rows,
        "summary": summary,
        "notes": [
            "time ratio = vidpar latency / raw torch.distributed latency (1.00 = no overhead),"
            " the median over runs of each run's ratio",
            "vidpar's all_gather/reduce_scatter/all_to_all allocate their output each call;"
            " the raw calls write into preallocated buffers",
        ],
    }
    if options.plot:
        plot({**report, "host": host_info(common.device)}, options.plot)
        report["plot"] = options.plot
    return report


def table(report: dict[str, Any]) -> str:
    rows = []
    for r in report["results"]:
        rows.append(
            {
                "op": r["op"],
                "size": format_bytes(r["bytes"]),
                "vidpar": format_seconds(r["vidpar"]["median_s"]),
                "raw": format_seconds(r["raw"]["median_s"]),
                "ratio": f"{r['time_ratio_vidpar_over_raw']:.2f}",
                "v_busbw": f"{r['vidpar']['busbw_GBps']:.3f}",
                "r_busbw": f"{r['raw']['busbw_GBps']:.3f}",
                "v_algbw": f"{r['vidpar']['algbw_GBps']:.3f}",
            }
        )
    return format_table(
        rows,
        [
            ("op", "op"),
            ("size", "size"),
            ("vidpar", "vidpar time"),
            ("raw", "raw time"),
            ("ratio", "vidpar/raw"),
            ("v_algbw", "vidpar algbw GB/s"),
            ("v_busbw", "vidpar busbw GB/s"),
            ("r_busbw", "raw busbw GB/s"),
        ],
    )


def plot(report: dict[str, Any], path: str) -> None:
    """busbw against size, one panel per op, vidpar and raw torch.distributed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    def size_label(x: float, _pos: int) -> str:
        return format_bytes(x).replace(" ", "").replace("iB", "").replace(".0", "")

    ops = list(dict.fromkeys(r["op"] for r in report["results"]))
    fig, axes = plt.subplots(1, len(ops), figsize=(4 * len(ops), 3.4), squeeze=False)
    for ax, op in zip(axes[0], ops, strict=True):
        rows = [r for r in report["results"] if r["op"] == op]
        sizes = [r["bytes"] for r in rows]
        ax.plot(sizes, [r["vidpar"]["busbw_GBps"] for r in rows], "o-", label="vidpar")
        ax.plot(sizes, [r["raw"]["busbw_GBps"] for r in rows], "s--", label="torch.distributed")
        ax.set_xscale("log", base=4)
        ax.set_yscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(size_label))
        ax.set_title(f"{op} (world {rows[0]['world']})")
        ax.set_xlabel("size")
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("busbw (GB/s)")
    axes[0][0].legend()
    host = report.get("host", {})
    if host:
        fig.suptitle(
            f"vidpar vs torch.distributed, {host.get('device')} ({host.get('processor')}, "
            f"{host.get('cpus')} cpus), torch {host.get('torch')}",
            fontsize=9,
        )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":  # python -m vidpar.benchmarks.collectives REPORT.json OUT.png
    import json
    import sys

    if len(sys.argv) != 3:
        raise SystemExit("usage: python -m vidpar.benchmarks.collectives REPORT.json OUT.png")
    with open(sys.argv[1]) as f:
        plot(json.load(f), sys.argv[2])
