"""``rpc``: the round trip of ``Executor.collective_rpc``.

A no-op RPC (``ping``) with 1, 2 and 4 workers, and an RPC that carries a 64 MiB tensor
to the workers and back, against two baselines that send the same tensor to one echo
process over a plain ``multiprocessing`` pipe (in-band pickle; torch's own shared-memory
reductions). Workers are CPU processes whatever the device: this measures the request
path, not a device.
"""

from __future__ import annotations

import multiprocessing as mp
import pickle
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from vidpar.benchmarks.common import Common, format_table


@dataclass
class RpcOptions:
    """``calls`` no-op calls per run after ``call_warmup``; ``tensor_calls`` calls per run
    of a ``tensor_mib`` MiB tensor; ``baselines``: also time the pipe baselines."""

    workers: list[int] = field(default_factory=lambda: [1, 2, 4])
    calls: int = 2000
    call_warmup: int = 200
    tensor_mib: int = 64
    tensor_calls: int = 5
    tensor_workers: list[int] = field(default_factory=lambda: [1, 2])
    baselines: bool = True


def _echo(worker, tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _time_calls(fn: Callable[[], Any], calls: int) -> list[float]:
    """Seconds taken by each of ``calls`` calls of ``fn``."""
    out = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def summary(name: str, workers: int, runs: list[list[float]], nbytes: int = 0) -> dict:
    """Median of the per-run medians (the headline), plus spread over every call."""
    medians = [statistics.median(run) for run in runs]
    every = sorted(t for run in runs for t in run)
    row = {
        "name": name,
        "workers": workers,
        "runs": len(runs),
        "calls_per_run": len(runs[0]),
        "median_s": statistics.median(medians),
        "run_medians_s": medians,
        "p10_s": every[len(every) // 10],
        "p90_s": every[(len(every) * 9) // 10],
        "min_s": every[0],
    }
    if nbytes:
        row["bytes_each_way"] = nbytes
        row["GBps"] = 2 * nbytes / row["median_s"] / 1e9
    return row


def bench_noop(workers: int, runs: int, calls: int, warmup: int) -> dict:
    """No-op ``collective_rpc('ping')`` round trips with ``workers`` CPU workers."""
    from vidpar.config import ParallelConfig
    from vidpar.executor import Executor

    with Executor(ParallelConfig(dp=workers), devices="cpu") as ex:
        for _ in range(warmup):
            ex.collective_rpc("ping")
        samples = [_time_calls(lambda: ex.collective_rpc("ping"), calls) for _ in range(runs)]
    return summary("no-op collective_rpc('ping')", workers, samples)


def bench_tensor(workers: int, runs: int, calls: int, mib: int) -> dict:
    """A ``mib`` MiB float32 tensor to every worker and back from each."""
    from vidpar.config import ParallelConfig
    from vidpar.executor import Executor

    tensor = torch.randn(mib * 1024 * 1024 // 4)
    with Executor(ParallelConfig(dp=workers), devices="cpu") as ex:
        back = ex.collective_rpc(_echo, tensor)
        assert all(torch.equal(b, tensor) for b in back)
        del back
        samples = [
            _time_calls(lambda: ex.collective_rpc(_echo, tensor), calls) for _ in range(runs)
        ]
    return summary(f"{mib} MiB tensor there and back", workers, samples, tensor.nbytes)


def _pipe_echo(conn, mode: str) -> None:
    torch.set_num_threads(1)
    while True:
        if mode == "pickle":
            data = conn.recv_bytes()
            if data == b"stop":
                return
            conn.send_bytes(pickle.dumps(pickle.loads(data), protocol=pickle.HIGHEST_PROTOCOL))
        else:
            obj = conn.recv()
            if obj is None:
                return
            conn.send(obj)


def bench_pipe_baseline(mode: str, runs: int, calls: int, mib: int) -> dict:
    """One echo process over a multiprocessing pipe: ``pickle`` sends the bytes in-band
    (the slow path), ``torch-mp`` uses torch.multiprocessing's shared-memory reductions
    (the tensor is moved into shared memory and its descriptor passed)."""
    import torch.multiprocessing  # registers the shared-memory reductions

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_pipe_echo, args=(child, mode), daemon=True)
    proc.start()
    child.close()
    tensor = torch.randn(mib * 1024 * 1024 // 4)

    def once() -> None:
        if mode == "pickle":
            parent.send_bytes(pickle.dumps(tensor, protocol=pickle.HIGHEST_PROTOCOL))
            back = pickle.loads(parent.recv_bytes())
        else:
            # A fresh tensor each call, as collective_rpc sees fresh arguments; torch moves
            # it into shared memory on the first send.
            parent.send(tensor.clone())
            back = parent.recv()
        assert back.shape == tensor.shape

    try:
        once()
        samples = [_time_calls(once, calls) for _ in range(runs)]
    finally:
        if mode == "pickle":
            parent.send_bytes(b"stop")
        else:
            parent.send(None)
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()
    return summary(f"baseline: mp pipe, {mode}, {mib} MiB", 1, samples, tensor.nbytes)


def run(options: RpcOptions, common: Common) -> dict[str, Any]:
    """Every measurement, ``common.runs`` runs each."""
    runs = common.runs
    rows = [bench_noop(n, runs, options.calls, options.call_warmup) for n in options.workers]
    rows += [
        bench_tensor(n, runs, options.tensor_calls, options.tensor_mib)
        for n in options.tensor_workers
    ]
    if options.baselines:
        rows += [
            bench_pipe_baseline(mode, runs, options.tensor_calls, options.tensor_mib)
            for mode in ("pickle", "torch-mp")
        ]
    two = [r for r in rows if r["name"].startswith("no-op") and r["workers"] == 2]
    summary_ = {"noop_2_workers_us": two[0]["median_s"] * 1e6} if two else {}
    if two:
        summary_["target_us"] = 200.0
        summary_["target_met"] = summary_["noop_2_workers_us"] <= 200.0
    return {
        "results": rows,
        "summary": summary_,
        "notes": ["workers are CPU processes: this measures the Executor's request path"],
    }


def table(report: dict[str, Any]) -> str:
    rows = []
    for row in report["results"]:
        scale, unit = (1e6, "us") if row["median_s"] < 1e-2 else (1e3, "ms")
        cells = {k: f"{row[k] * scale:.1f} {unit}" for k in ("median_s", "p10_s", "p90_s")}
        rate = f"{row['GBps']:.2f}" if "GBps" in row else ""
        rows.append({"name": row["name"], "workers": row["workers"], **cells, "rate": rate})
    return format_table(
        rows,
        [
            ("name", "measurement"),
            ("workers", "workers"),
            ("median_s", "median"),
            ("p10_s", "p10"),
            ("p90_s", "p90"),
            ("rate", "GB/s"),
        ],
    )
