"""What starting workers costs, forked from the fork server (the default) against spawned
(``VIDPAR_START_METHOD=spawn``), interleaved run by run on this machine:

* an Executor of two CPU workers, started three times in one Python process, until both
  answer an RPC (the first start of the fork server's kind also starts the server);
* ``vidpar-train trainer.max_steps=10 logger=none`` end to end (4 workers, tp2 × sp2).

``python benchmarks/worker_start.py [runs]`` (default 3) prints medians and min/max."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

METHODS = ("forkserver", "spawn")
PROBE = """
import json, operator, time
import vidpar.lightning  # what vidpar-train has imported when it starts its workers
from vidpar import ParallelConfig
from vidpar.executor import Executor

if __name__ == "__main__":
    times = []
    for _ in range(3):
        begin = time.perf_counter()
        with Executor(ParallelConfig(dp=2), devices="cpu", init_distributed=False) as ex:
            ex.collective_rpc(operator.attrgetter("rank"))
            times.append(time.perf_counter() - begin)
    print(json.dumps(times))
"""
TRAIN = ["vidpar-train", "trainer.max_steps=10", "logger=none"]


def _env(method: str) -> dict[str, str]:
    return {**os.environ, "VIDPAR_START_METHOD": method}


def executor_starts(method: str) -> list[float]:
    shown = subprocess.run(
        [sys.executable, "-c", PROBE], env=_env(method), capture_output=True, text=True, check=True
    )
    return json.loads(shown.stdout.splitlines()[-1])


def train_seconds(method: str, folder: str) -> float:
    begin = time.perf_counter()
    subprocess.run(TRAIN, env=_env(method), cwd=folder, capture_output=True, check=True)
    return time.perf_counter() - begin


def summary(values: list[float]) -> str:
    return (
        f"median {statistics.median(values):6.2f} s "
        f"(min {min(values):.2f}, max {max(values):.2f}, n={len(values)})"
    )


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    first = {m: [] for m in METHODS}
    later = {m: [] for m in METHODS}
    train = {m: [] for m in METHODS}
    with tempfile.TemporaryDirectory() as folder:
        for _ in range(runs):
            for method in METHODS:
                times = executor_starts(method)
                first[method].append(times[0])
                later[method] += times[1:]
                train[method].append(train_seconds(method, folder))
    for method in METHODS:
        print(f"{method:10s} Executor, first start   {summary(first[method])}")
        print(f"{method:10s} Executor, later starts  {summary(later[method])}")
        print(f"{method:10s} vidpar-train, 10 steps  {summary(train[method])}")


if __name__ == "__main__":
    main()
