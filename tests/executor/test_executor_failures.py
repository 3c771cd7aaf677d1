"""The Executor's failures with real worker processes on CPU: deaths, timeouts and
start-up errors end it and leave no process behind; environment mode; orphans."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from test_executor import CALL, START, _assert_no_leftovers, _children, _gone
from vidpar import ParallelConfig
from vidpar.distributed import state as ps
from vidpar.executor import (
    Executor,
    ExecutorError,
    RemoteError,
    RpcTimeoutError,
    Worker,
    WorkerDiedError,
)
from vidpar.executor.processes import SHUTDOWN_GRACE_S

# Functions the workers run (module level, so they pickle by reference) -------------------


def _sleep(worker: Worker, seconds: float, marker_dir: str | None = None) -> None:
    if marker_dir is not None:
        Path(marker_dir, f"started-{worker.rank}").touch()
    time.sleep(seconds)


def _sleep_on(worker: Worker, rank: int, seconds: float, marker_dir: str) -> int:
    """On ``rank``: start a child process of its own (like a data loader), then hang."""
    if worker.rank == rank:
        child = subprocess.Popen(["sleep", str(seconds)])
        Path(marker_dir, "grandchild").write_text(str(child.pid))
        time.sleep(seconds)
    return worker.rank


def _fail_then_collective(worker: Worker) -> float:
    if worker.rank == 1:
        raise RuntimeError("rank 1 fails before the all-reduce")
    return ps.get_tp_group().all_reduce(torch.ones(1)).item()  # rank 0 waits forever


def _fail_factory_on_rank_1(worker: Worker):
    if worker.rank == 1:
        raise RuntimeError("factory failed on purpose")
    return None


def _env_report(worker: Worker) -> dict:
    keys = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "VIDPAR_FLAG")
    return {
        "env": {k: os.environ.get(k) for k in keys},
        "dist": dist.is_initialized(),
        "layout": ps.model_parallel_is_initialized(),
        "device": str(worker.device),
    }


def _init_from_env_and_sum(worker: Worker) -> float:
    """What a Lightning Trainer does in this mode: join the world from the environment."""
    dist.init_process_group("gloo")
    try:
        tensor = torch.tensor([float(dist.get_rank() + 1)])
        dist.all_reduce(tensor)
        return tensor.item()
    finally:
        dist.destroy_process_group()


# Failures that end the Executor ---------------------------------------------------------


def test_worker_killed_mid_rpc_is_detected_within_a_second(tmp_path):
    before = _children()
    ex = Executor(ParallelConfig(tp=2), devices="cpu", startup_timeout=START)
    pids = list(ex.pids)
    killed_at: list[float] = []

    def kill_when_started() -> None:
        deadline = time.monotonic() + CALL
        while time.monotonic() < deadline:
            if all((tmp_path / f"started-{r}").exists() for r in range(2)):
                os.kill(pids[1], signal.SIGKILL)
                killed_at.append(time.monotonic())
                return
            time.sleep(0.01)

    killer = threading.Thread(target=kill_when_started)
    killer.start()
    try:
        with pytest.raises(WorkerDiedError) as info:
            ex.collective_rpc(_sleep, 120.0, str(tmp_path), timeout=CALL + 30)
        raised_at = time.monotonic()
    finally:
        killer.join()
        ex.shutdown()
    assert killed_at, "the RPC never started on both workers"
    latency = raised_at - killed_at[0]
    print(f"death detected and every worker stopped {latency * 1e3:.0f} ms after SIGKILL")
    assert latency <= 1.0
    assert info.value.rank == 1 and info.value.exitcode == -signal.SIGKILL
    assert "SIGKILL" in str(info.value)
    assert not ex.is_alive
    _assert_no_leftovers(before, pids)
    with pytest.raises(ExecutorError, match="shut down"):
        ex.collective_rpc("ping")


def test_worker_that_died_while_idle_fails_the_next_call():
    before = _children()
    ex = Executor(ParallelConfig(), init_distributed=False, devices="cpu", startup_timeout=START)
    pids = list(ex.pids)
    os.kill(pids[0], signal.SIGKILL)
    deadline = time.monotonic() + CALL
    while not _gone(pids[0]) and time.monotonic() < deadline:  # dead, not reaped (that is
        time.sleep(0.01)  # the Executor's job, and where it reads the exit code)
    started = time.monotonic()
    with pytest.raises(WorkerDiedError) as info:
        ex.collective_rpc("ping", timeout=CALL)
    assert time.monotonic() - started < CALL / 2  # at once, not by the call's timeout
    assert info.value.rank == 0 and info.value.exitcode == -signal.SIGKILL
    _assert_no_leftovers(before, pids)


def test_timeout_names_the_silent_ranks_and_stops_everything(tmp_path):
    before = _children()
    ex = Executor(
        ParallelConfig(dp=2), init_distributed=False, devices="cpu", startup_timeout=START
    )
    pids = list(ex.pids)
    started = time.monotonic()
    with pytest.raises(TimeoutError) as info:
        ex.collective_rpc(_sleep_on, 1, 120.0, str(tmp_path), timeout=3.0)
    elapsed = time.monotonic() - started
    assert isinstance(info.value, RpcTimeoutError) and info.value.ranks == [1]
    assert "ranks [1] did not answer within 3 s" in str(info.value)
    assert elapsed >= 3.0  # not before the timeout (load can only make this later)
    assert elapsed < 60.0  # 20x the quiet 3 s, and long before rank 1's 120 s sleep
    _assert_no_leftovers(before, pids)
    assert _gone(int((tmp_path / "grandchild").read_text()))  # the worker's own child too
    ex.shutdown()  # idempotent
    ex.shutdown()
    with pytest.raises(ExecutorError, match="shut down"):
        ex.collective_rpc("ping")


def test_ranks_stuck_after_a_remote_error_are_stopped():
    before = _children()
    ex = Executor(ParallelConfig(tp=2), error_grace_s=1.0, devices="cpu", startup_timeout=START)
    pids = list(ex.pids)
    with pytest.raises(RemoteError) as info:
        ex.collective_rpc(_fail_then_collective, timeout=CALL)
    assert info.value.rank == 1 and "fails before the all-reduce" in info.value.remote_traceback
    assert "ranks [0] were still busy" in str(info.value)
    assert not ex.is_alive
    _assert_no_leftovers(before, pids)


def test_start_up_failure_reports_the_rank_and_leaves_nothing():
    before = _children()
    with pytest.raises(RemoteError) as info:
        Executor(
            ParallelConfig(dp=2),
            worker_factory=_fail_factory_on_rank_1,
            init_distributed=False,
            devices="cpu",
            startup_timeout=START,
        )
    assert info.value.rank == 1 and "factory failed on purpose" in info.value.remote_traceback
    assert "_fail_factory_on_rank_1" in info.value.remote_traceback
    assert _children() - before == set()


# Environment mode and clean shutdown -----------------------------------------------------


def test_environment_mode_exports_the_rendezvous_and_leaves_dist_alone():
    before = _children()
    with Executor(
        ParallelConfig(dp=2),
        init_distributed=False,
        env={"VIDPAR_FLAG": "on"},
        devices="cpu",
        startup_timeout=START,
    ) as ex:
        pids = list(ex.pids)
        reports = ex.collective_rpc(_env_report, timeout=CALL)
        for rank, report in enumerate(reports):
            env = report["env"]
            assert env["RANK"] == env["LOCAL_RANK"] == str(rank)
            assert env["WORLD_SIZE"] == "2" and env["VIDPAR_FLAG"] == "on"
            assert env["MASTER_ADDR"] == "127.0.0.1" and int(env["MASTER_PORT"]) > 0
            assert not report["dist"] and not report["layout"]
            assert report["device"] == "cpu"
        assert reports[0]["env"]["MASTER_PORT"] == reports[1]["env"]["MASTER_PORT"]
        # A long call with no timeout, as Trainer.fit would be, joining the world itself.
        assert ex.collective_rpc(_init_from_env_and_sum, timeout=None) == [3.0, 3.0]
        started = time.monotonic()
        ex.shutdown()
        # They left politely: before the grace after which they would be killed.
        assert time.monotonic() - started < SHUTDOWN_GRACE_S
    _assert_no_leftovers(before, pids)
    assert "VIDPAR_FLAG" not in os.environ


# Orphans -----------------------------------------------------------------------------

_PARENT = textwrap.dedent(
    """
    import sys, threading, time
    from vidpar import ParallelConfig
    from vidpar.executor import Executor

    KEEP = []

    def busy(worker, seconds):
        time.sleep(seconds)

    def main():
        mode = sys.argv[1]
        make = lambda: KEEP.append(
            Executor(ParallelConfig(dp=2), devices="cpu", init_distributed=False)
        )
        if mode == "thread":  # no death signal: the workers' watchdog must act
            thread = threading.Thread(target=make)
            thread.start()
            thread.join()
        else:
            make()
        print(" ".join(map(str, KEEP[0].pids)), flush=True)
        if mode == "exit":  # no shutdown(): the atexit hook must stop the workers
            return
        KEEP[0].collective_rpc(busy, 600)  # busy workers do not notice a closed pipe

    if __name__ == "__main__":
        main()
    """
)


def test_workers_end_with_their_parent(tmp_path):
    """SIGKILL of the parent (death signal; watchdog when created off the main thread) and
    a parent that simply exits without shutdown() (atexit) leave no worker behind."""
    script = tmp_path / "parent.py"
    script.write_text(_PARENT)
    parents = {
        mode: subprocess.Popen(
            [sys.executable, str(script), mode], stdout=subprocess.PIPE, text=True, cwd=tmp_path
        )
        for mode in ("main", "thread", "exit")
    }
    workers: dict[str, list[int]] = {}
    try:
        for mode, parent in parents.items():
            line = parent.stdout.readline()  # printed once its workers are ready
            assert line, f"the {mode} parent exited with {parent.wait()}"
            workers[mode] = [int(p) for p in line.split()]
            assert len(workers[mode]) == 2
        assert parents["exit"].wait(timeout=CALL) == 0  # no hang joining live workers
        time.sleep(0.5)  # let the other workers enter the long RPC
        for mode in ("main", "thread"):
            parents[mode].kill()
            parents[mode].wait()
        for mode, pids in workers.items():
            deadline = time.monotonic() + 10.0
            while not all(_gone(p) for p in pids) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert all(_gone(p) for p in pids), f"{mode}: orphans {pids} still run"
    finally:
        for mode, parent in parents.items():
            parent.kill()
            parent.wait()
            for pid in workers.get(mode, []):
                if not _gone(pid):
                    os.kill(pid, signal.SIGKILL)
