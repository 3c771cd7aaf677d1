"""No orphans: what a worker starts (a data loader worker, a ``subprocess``) dies with it,
whether the worker is SIGKILLed, the Executor's process is SIGKILLed or interrupted with
Ctrl-C, or the Executor shuts down; checked with real signals and psutil."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import torch

from vidpar import ParallelConfig
from vidpar.executor import Executor, Worker, WorkerDiedError

START = 120.0
CALL = 120.0
#: Generous: the reaper acts at once, a loaded machine may take seconds to schedule it.
GONE_WITHIN = 20.0


class _Clips(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 1000

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.full((2,), float(index))


def start_children(worker: Worker) -> list[int]:
    """Start what a training worker typically starts: a data loader worker process and a
    subprocess; return the pids of every process below this worker."""
    worker.loader = iter(torch.utils.data.DataLoader(_Clips(), num_workers=1))
    next(worker.loader)
    worker.child = subprocess.Popen(["sleep", "600"])
    return [c.pid for c in psutil.Process().children(recursive=True)]


def sleep(worker: Worker, seconds: float) -> None:
    time.sleep(seconds)


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_gone(pids: list[int], timeout: float = GONE_WITHIN) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not all(gone(p) for p in pids):
        time.sleep(0.05)
    return [p for p in pids if not gone(p)]


@pytest.fixture
def executor():
    ex = Executor(
        ParallelConfig(dp=2), init_distributed=False, devices="cpu", startup_timeout=START
    )
    yield ex
    ex.shutdown()


def test_children_of_a_sigkilled_worker_die_with_it(executor):
    children = executor.collective_rpc(start_children, timeout=CALL)
    assert all(len(c) == 2 for c in children)  # a data loader worker and `sleep`
    victim = executor.pids[1]
    killer = subprocess.Popen(["sh", "-c", f"sleep 1; kill -KILL {victim}"])
    with pytest.raises(WorkerDiedError) as info:
        executor.collective_rpc(sleep, 60.0, timeout=CALL)
    killer.wait()
    assert info.value.rank == 1
    everything = [*executor_pids(children), victim]
    assert wait_gone(everything) == []


def executor_pids(children: list[list[int]]) -> list[int]:
    return [pid for rank in children for pid in rank]


def test_children_end_when_the_executor_shuts_down(executor):
    children = executor_pids(executor.collective_rpc(start_children, timeout=CALL))
    workers = list(executor.pids)
    executor.shutdown()
    assert wait_gone([*children, *workers]) == []


_PARENT = textwrap.dedent(
    """
    import faulthandler, json, signal, sys
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # stacks, if the test times out
    # As started from a terminal: a suite run in the background (`pytest &`) hands its
    # children SIGINT ignored, and Ctrl-C would then never reach this program.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.path.insert(0, sys.argv[1])
    from test_orphans import sleep, start_children
    from vidpar import ParallelConfig
    from vidpar.executor import Executor

    if __name__ == "__main__":
        ex = Executor(ParallelConfig(dp=2), devices="cpu", init_distributed=False)
        children = ex.collective_rpc(start_children)
        print(json.dumps({"workers": ex.pids, "children": children}), flush=True)
        ex.collective_rpc(sleep, 600)
    """
)


@pytest.mark.parametrize("how", ["sigkill", "ctrl-c"])
def test_nothing_outlives_the_executors_process(tmp_path, how):
    """SIGKILL of the Executor's process: its workers die by their death signal before
    any of their code runs, so the reaper kills their groups. Ctrl-C: the Executor kills
    them (workers ignore SIGINT)."""
    script = tmp_path / "parent.py"
    script.write_text(_PARENT)
    parent = subprocess.Popen(
        [sys.executable, str(script), str(Path(__file__).parent)],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    pids: list[int] = []
    try:
        line = parent.stdout.readline()
        assert line, f"the parent exited with {parent.wait()}"
        report = json.loads(line)
        pids = [*report["workers"], *executor_pids(report["children"])]
        everything = [c.pid for c in psutil.Process(parent.pid).children(recursive=True)]
        assert set(pids) <= set(everything)  # plus the reaper
        time.sleep(0.5)  # let the workers enter the long RPC
        if how == "sigkill":
            parent.kill()
        else:
            os.killpg(parent.pid, signal.SIGINT)  # what a terminal does on Ctrl-C
        try:
            parent.wait(timeout=CALL)
        except subprocess.TimeoutExpired:
            os.kill(parent.pid, signal.SIGUSR1)  # where it hangs, into the captured stderr
            time.sleep(2.0)
            raise
        assert wait_gone(everything) == []
    finally:
        parent.kill()
        parent.wait()
        for pid in pids:
            if not gone(pid):
                os.kill(pid, signal.SIGKILL)
