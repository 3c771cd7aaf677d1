"""Round trip of Executor.collective_rpc on CPU workers.

Measures a no-op RPC (``ping``) with 1, 2 and 4 workers, and an RPC that carries a 64 MiB
tensor to the workers and back, against two baselines that send the same tensor to one
echo process over a plain ``multiprocessing`` pipe (in-band pickle; torch's own
shared-memory reductions). Prints a table and writes JSON::

    python benchmarks/bench_rpc.py benchmarks/results/bench_rpc_cpu.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import os
import pickle
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from vidpar import ParallelConfig
from vidpar.executor import Executor, Worker


def _echo(worker: Worker, tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _time_calls(fn, calls: int) -> list[float]:
    """Seconds taken by each of ``calls`` calls of ``fn``."""
    out = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def _summary(name: str, workers: int, runs: list[list[float]], nbytes: int = 0) -> dict:
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
    with Executor(ParallelConfig(dp=workers), devices="cpu") as ex:
        for _ in range(warmup):
            ex.collective_rpc("ping")
        samples = [_time_calls(lambda: ex.collective_rpc("ping"), calls) for _ in range(runs)]
    return _summary("no-op collective_rpc('ping')", workers, samples)


def bench_tensor(workers: int, runs: int, calls: int, mib: int) -> dict:
    tensor = torch.randn(mib * 1024 * 1024 // 4)
    with Executor(ParallelConfig(dp=workers), devices="cpu") as ex:
        back = ex.collective_rpc(_echo, tensor)
        assert all(torch.equal(b, tensor) for b in back)
        del back
        samples = [
            _time_calls(lambda: ex.collective_rpc(_echo, tensor), calls) for _ in range(runs)
        ]
    return _summary(f"{mib} MiB tensor there and back", workers, samples, tensor.nbytes)


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
    return _summary(f"baseline: mp pipe, {mode}, {mib} MiB", 1, samples, tensor.nbytes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="where to write the JSON results")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--runs", type=int, default=5, help="repetitions of each measurement")
    parser.add_argument("--calls", type=int, default=2000, help="no-op calls per run")
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--tensor-mib", type=int, default=64)
    parser.add_argument("--tensor-calls", type=int, default=5, help="tensor calls per run")
    parser.add_argument("--tensor-workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--no-baselines", action="store_true")
    args = parser.parse_args()

    rows = [bench_noop(n, args.runs, args.calls, args.warmup) for n in args.workers]
    rows += [
        bench_tensor(n, args.runs, args.tensor_calls, args.tensor_mib) for n in args.tensor_workers
    ]
    if not args.no_baselines:
        rows += [
            bench_pipe_baseline(mode, args.runs, args.tensor_calls, args.tensor_mib)
            for mode in ("pickle", "torch-mp")
        ]

    print(f"{'measurement':<40} {'workers':>7} {'median':>11} {'p10':>11} {'p90':>11}  GB/s")
    for row in rows:
        scale, unit = (1e6, "us") if row["median_s"] < 1e-2 else (1e3, "ms")
        cells = [f"{row[k] * scale:8.1f} {unit}" for k in ("median_s", "p10_s", "p90_s")]
        rate = f"{row['GBps']:5.2f}" if "GBps" in row else ""
        print(f"{row['name']:<40} {row['workers']:>7} {' '.join(cells)}  {rate}")

    report = {
        "benchmark": "executor_rpc_round_trip",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.date.today().isoformat(),
        "host": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
