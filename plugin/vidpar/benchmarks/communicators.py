"""``communicators``: per-call time of each CUDA communicator path on the same tensors in
the same run: torch's NCCL (:class:`DeviceCommunicator`), pynccl
(:class:`CudaCommunicator` with ``communicator=pynccl``) and, with ``graph``, the pynccl
call captured in a CUDA graph and replayed.

Every path goes through the communicator's public method (the shaping vidpar does is the
same for all), timed by CUDA events around each call; the paths take turns leading each
iteration. With ``world=1`` (what one GPU can run: NCCL refuses two ranks on one GPU)
NCCL only copies locally, so the figures are per-call latency of each path, not
collective bandwidth.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from vidpar.benchmarks.common import (
    Common,
    IterationTimer,
    check_choices,
    format_bytes,
    format_seconds,
    format_table,
    geometric_sizes,
    median,
    paired_ratio,
    slowest_rank_stats,
    synchronize,
    torch_dtype,
)

OPS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "broadcast")
PATHS = ("torch", "pynccl", "pynccl_graph")


@dataclass
class CommunicatorsOptions:
    """``world`` ranks (1: one GPU); sizes from ``min_bytes`` to ``max_bytes`` multiplying
    by ``factor``; ``graph``: also time pynccl replayed from a CUDA graph."""

    world: int = 1
    ops: list[str] = field(default_factory=lambda: list(OPS))
    min_bytes: Any = "1KiB"
    max_bytes: Any = "64MiB"
    factor: int = 4
    dtype: str = "float32"
    graph: bool = True


def _call(comm: Any, op: str, nbytes: int, dtype: torch.dtype, device) -> Callable[[], Any]:
    """One call of ``op`` on ``comm`` with ``nbytes`` (the nccl-tests size: all_gather's
    output, the others' input)."""
    n = comm.world_size
    numel = max(n, nbytes // torch.empty((), dtype=dtype).element_size() // n * n)
    x = torch.zeros(numel // n if op == "all_gather" else numel, dtype=dtype, device=device)
    calls = {
        "all_reduce": lambda: comm.all_reduce(x),
        "all_gather": lambda: comm.all_gather(x, 0),
        "reduce_scatter": lambda: comm.reduce_scatter(x, 0),
        "all_to_all": lambda: comm.all_to_all(x, 0, 0),
        "broadcast": lambda: comm.broadcast(x, 0),
    }
    return calls[op]


def _captured(fn: Callable[[], Any], device) -> Callable[[], Any]:
    """``fn`` captured once in a CUDA graph (after a warm-up on a side stream); replays."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)  # nothing of torch's NCCL left in flight during capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def _worker_sweep(
    worker, sizes: list[int], ops: list[str], dtype_name: str, graph: bool, common: Common
) -> dict[str, Any]:
    """In each worker: every (size, op) of one run; per-iteration times of every path."""
    from vidpar.distributed import state as ps
    from vidpar.distributed.device_communicators import CudaCommunicator, DeviceCommunicator

    device, dtype = worker.device, torch_dtype(dtype_name)
    coord = ps.get_world_group()
    args = (coord.cpu_group, coord.device_group, coord.ranks, coord.rank_in_group, device)
    torch_nccl = DeviceCommunicator(*args)
    pynccl = CudaCommunicator(*args, prefer="pynccl")
    if pynccl.pynccl is None:
        raise RuntimeError("pynccl did not start on this worker (its log line says why)")
    rows = []
    try:
        for nbytes in sizes:
            for op in ops:
                fns = {
                    "torch": _call(torch_nccl, op, nbytes, dtype, device),
                    "pynccl": _call(pynccl, op, nbytes, dtype, device),
                }
                if graph:
                    fns["pynccl_graph"] = _captured(
                        _call(pynccl, op, nbytes, dtype, device), device
                    )
                rows.append({"op": op, "bytes": nbytes, **_time_paths(fns, device, coord, common)})
    finally:
        synchronize(device)
        pynccl.close()
    return {"library": repr(pynccl.pynccl.library), "rows": rows}


def _time_paths(fns: dict[str, Callable[[], Any]], device, coord, common: Common) -> dict:
    names = list(fns)
    for _ in range(common.warmup):
        for fn in fns.values():
            fn()
    synchronize(device)
    coord.barrier()
    timers = {name: IterationTimer(device) for name in names}
    for i in range(common.repeats):
        k = i % len(names)  # each path leads in turn
        for name in names[k:] + names[:k]:
            timers[name].time(fns[name])
    return {name: timer.seconds() for name, timer in timers.items()}


def summarise(per_run: list[list[dict[str, Any]]], world: int) -> list[dict[str, Any]]:
    """Runs × ranks × rows of per-iteration times -> one row per (op, size): each path's
    statistics (the slowest rank per iteration) and its time over torch's."""
    rows = []
    for index, first in enumerate(per_run[0][0]["rows"]):
        row: dict[str, Any] = {"op": first["op"], "bytes": first["bytes"], "world": world}
        medians = {}
        for path in PATHS:
            if path not in first:
                continue
            row[path] = slowest_rank_stats(
                per_run, lambda rank, i=index, p=path: rank["rows"][i][p]
            )
            medians[path] = row[path]["run_medians_s"]
        for path in medians.keys() - {"torch"}:
            row[f"{path}_over_torch"] = paired_ratio(medians[path], medians["torch"])["ratio"]
        rows.append(row)
    return rows


def run(options: CommunicatorsOptions, common: Common) -> dict[str, Any]:
    """Sweep sizes × ops ``common.runs`` times in one world of ``options.world`` GPUs."""
    from vidpar.config import ParallelConfig
    from vidpar.executor import Executor

    if not common.cuda:
        raise ValueError("communicators compares CUDA paths: run it with device=cuda")
    if options.world < 1:
        raise ValueError(f"communicators.world must be at least 1, got {options.world}")
    check_choices("collective", options.ops, OPS)
    sizes = geometric_sizes(options.min_bytes, options.max_bytes, options.factor)
    sweep = (sizes, options.ops, options.dtype, options.graph, common)
    with Executor(ParallelConfig(dp=options.world), devices="cuda") as ex:
        per_run = [ex.collective_rpc(_worker_sweep, *sweep) for _ in range(common.runs)]
    rows = summarise(per_run, options.world)
    summary = {
        op: {
            f"median_{key}": median(r[key] for r in rows if r["op"] == op)
            for key in ("pynccl_over_torch", "pynccl_graph_over_torch")
            if key in rows[0]
        }
        for op in options.ops
    }
    scope = (
        "one GPU, world 1: per-call latency of each path (NCCL copies locally), not "
        "collective bandwidth"
        if options.world == 1
        else f"world {options.world}: per-call time of each path"
    )
    return {
        "results": rows,
        "summary": summary,
        "library": per_run[0][0]["library"],
        "notes": [
            scope,
            "x_over_torch = that path's time / torch's NCCL time, the median over runs of "
            "each run's ratio (below 1: faster than torch's NCCL)",
            "pynccl_graph: the same call captured in a CUDA graph, one replay per iteration",
        ],
    }


def table(report: dict[str, Any]) -> str:
    rows = []
    for r in report["results"]:
        row = {
            "op": r["op"],
            "size": format_bytes(r["bytes"]),
            "torch": format_seconds(r["torch"]["median_s"]),
            "pynccl": format_seconds(r["pynccl"]["median_s"]),
            "ratio": f"{r['pynccl_over_torch']:.2f}",
        }
        if "pynccl_graph" in r:
            row["graph"] = format_seconds(r["pynccl_graph"]["median_s"])
            row["graph_ratio"] = f"{r['pynccl_graph_over_torch']:.2f}"
        rows.append(row)
    columns = [
        ("op", "op"),
        ("size", "size"),
        ("torch", "torch NCCL"),
        ("pynccl", "pynccl"),
        ("ratio", "pynccl/torch"),
        ("graph", "pynccl graph"),
        ("graph_ratio", "graph/torch"),
    ]
    if not any("graph" in row for row in rows):
        columns = columns[:5]
    return format_table(rows, columns)
