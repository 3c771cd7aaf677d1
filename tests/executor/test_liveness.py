"""Liveness with real worker processes: a SIGSTOPped worker is named (rank, RPC, training
step, Python stacks) within the heartbeat timeout, a busy one is not, a timeout names the
rank that stopped, and a rank that raises stops the others within the error grace."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import lightning.pytorch as pl
import psutil
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel

from test_interrupts import TRAIN, start_train, wait_for
from vidpar import ParallelConfig
from vidpar.distributed import state as ps
from vidpar.distributed.checkpoint import is_complete
from vidpar.executor import (
    Executor,
    RemoteError,
    RpcTimeoutError,
    Worker,
    WorkerStuckError,
    liveness,
)
from vidpar.executor.executor import ERROR_GRACE_S, HEARTBEAT_TIMEOUT_S
from vidpar.lightning import VidParStrategy

START = 120.0
#: A short heartbeat timeout for the tests; the default is a minute.
HEARTBEAT = 3.0
#: Generous: detection takes HEARTBEAT s plus a stack dump on a quiet machine.
DETECT_WITHIN = 60.0


def _all_reduce_until_stopped(worker: Worker, marker_dir: str) -> None:
    """Every rank all-reduces in a loop (so the others wait in a collective for one that
    stops); the loop runs far longer than any test."""
    liveness.set_activity(f"all-reducing on rank {worker.rank}")
    Path(marker_dir, f"started-{worker.rank}").write_text(str(os.getpid()))
    group = ps.get_world_group()
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        group.all_reduce(torch.ones(4))
        time.sleep(0.01)


def _hold_the_gil(worker: Worker, seconds: float) -> float:
    """Busy for ``seconds`` inside one C call that never releases the GIL (the heartbeat
    thread cannot run meanwhile)."""
    started = time.monotonic()
    sum(range(2_000_000))
    per_item = (time.monotonic() - started) / 2_000_000
    started = time.monotonic()
    sum(range(int(seconds / max(per_item, 1e-9))))
    return time.monotonic() - started


def _fail_then_collective(worker: Worker) -> float:
    if worker.rank == 1:
        raise RuntimeError("rank 1 fails before the all-reduce")
    return ps.get_world_group().all_reduce(torch.ones(1)).item()  # rank 0 waits for it


def _wait_for_markers(marker_dir: Path, ranks: int, timeout: float = 120.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        files = [marker_dir / f"started-{r}" for r in range(ranks)]
        if all(f.exists() and f.read_text() for f in files):
            return [int(f.read_text()) for f in files]
        time.sleep(0.02)
    raise AssertionError("the RPC never started on every rank")


def _stop_when_started(marker_dir: Path, ranks: int, rank: int, stopped: list) -> threading.Thread:
    def stop() -> None:
        pids = _wait_for_markers(marker_dir, ranks)
        time.sleep(0.3)  # let them enter the collective loop
        os.kill(pids[rank], signal.SIGSTOP)
        stopped.append((pids[rank], time.monotonic()))

    thread = threading.Thread(target=stop, daemon=True)
    thread.start()
    return thread


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_defaults_are_well_under_the_collective_timeout():
    assert 30 <= HEARTBEAT_TIMEOUT_S <= 120  # 30 min is gloo's and NCCL's default
    assert ERROR_GRACE_S <= 2.0


def test_a_sigstopped_worker_is_named_with_its_rpc_and_stacks(tmp_path):
    """collective_rpc(timeout=None) used to wait forever for a stopped worker."""
    ex = Executor(
        ParallelConfig(dp=2), devices="cpu", startup_timeout=START, heartbeat_timeout_s=HEARTBEAT
    )
    pids = list(ex.pids)
    stopped: list = []
    stopper = _stop_when_started(tmp_path, 2, 1, stopped)
    try:
        with pytest.raises(WorkerStuckError) as info:
            ex.collective_rpc(_all_reduce_until_stopped, str(tmp_path), timeout=None)
        raised_at = time.monotonic()
    finally:
        stopper.join()
        ex.shutdown()
    err = info.value
    latency = raised_at - stopped[0][1]
    print(f"stopped worker reported {latency:.1f} s after SIGSTOP (timeout {HEARTBEAT} s)")
    assert HEARTBEAT <= latency < DETECT_WITHIN
    assert err.rank == 1 and err.pid == pids[1] and "stopped" in err.state
    assert "_all_reduce_until_stopped" in err.activity and "all-reducing on rank 1" in err.activity
    assert "_all_reduce_until_stopped" in err.stacks  # faulthandler's dump, all threads
    assert "vidpar-heartbeat" in err.stacks or "_beat" in err.stacks
    assert "rank 0 in collective_rpc('_all_reduce_until_stopped')" in err.others
    assert "Python stacks of rank 1" in str(err)
    assert all(_gone(p) for p in pids)  # the stopped one too


def test_a_timeout_names_the_rank_that_stopped_not_every_rank(tmp_path):
    ex = Executor(
        ParallelConfig(dp=2), devices="cpu", startup_timeout=START, heartbeat_timeout_s=None
    )
    stopped: list = []
    stopper = _stop_when_started(tmp_path, 2, 1, stopped)
    try:
        with pytest.raises(RpcTimeoutError) as info:
            # The stop comes about 0.5 s after the call on a quiet machine: 30× that.
            ex.collective_rpc(_all_reduce_until_stopped, str(tmp_path), timeout=15.0)
    finally:
        stopper.join()
        ex.shutdown()
    assert stopped, "the RPC never started on both workers"
    err = info.value
    assert err.ranks == [1] and err.waiting == [0]
    assert "rank 1" in err.detail and "stopped" in err.detail
    assert "_all_reduce_until_stopped" in err.detail  # its stacks


def test_a_worker_busy_holding_the_gil_is_not_stuck():
    """No heartbeat for twice the timeout, but busy on a CPU: not a false alarm."""
    with Executor(
        ParallelConfig(dp=2),
        init_distributed=False,
        devices="cpu",
        startup_timeout=START,
        heartbeat_timeout_s=1.0,
    ) as ex:
        held = ex.collective_rpc(_hold_the_gil, 4.0, ranks=[1], timeout=120.0)
    assert held[0] >= 2.0


def _hold_the_gil_timed(worker: Worker, seconds: float) -> tuple[float, float]:
    """:func:`_hold_the_gil`: the wall seconds it took and the CPU seconds it got."""
    cpu = time.thread_time()
    wall = _hold_the_gil(worker, seconds)
    return wall, time.thread_time() - cpu


@contextlib.contextmanager
def _crowded_cpu(pid: int, hogs: int = 6):
    """``pid``'s main thread shares one CPU with ``hogs`` busy loops (a crowded node)."""
    cpu = min(os.sched_getaffinity(0))
    loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(hogs)]
    try:
        for loop in loops:
            os.sched_setaffinity(loop.pid, {cpu})
        os.sched_setaffinity(pid, {cpu})
        yield
    finally:
        for loop in loops:
            loop.kill()
            loop.wait()


def test_a_busy_worker_starved_of_cpu_is_not_stuck():
    """Holding the GIL on a CPU shared with six busy loops, the worker gets a seventh of
    it: time waiting for the CPU is not being stuck (it used to be called stuck)."""
    with Executor(
        ParallelConfig(),
        init_distributed=False,
        devices="cpu",
        startup_timeout=START,
        heartbeat_timeout_s=1.0,
    ) as ex:
        ex.collective_rpc(_hold_the_gil, 0.0, timeout=120.0)  # the worker imports this module
        with _crowded_cpu(ex.pids[0]):
            [(wall, cpu)] = ex.collective_rpc(_hold_the_gil_timed, 4.0, timeout=120.0)
    assert wall >= 2.0 and cpu < 0.5 * wall, (wall, cpu)  # it was starved: the case at hand


def _sleep_holding_the_gil(worker: Worker, seconds: int) -> None:
    """Asleep in a C call that keeps the GIL: not busy, yet the other threads cannot run."""
    ctypes.PyDLL(None).sleep(seconds)


def test_a_worker_asleep_holding_the_gil_is_stuck():
    """The other side: its threads barely wake (the heartbeat's bids for the GIL), so it is
    named within the timeout although its process is not stopped."""
    with (
        pytest.raises(WorkerStuckError) as info,
        Executor(
            ParallelConfig(),
            init_distributed=False,
            devices="cpu",
            startup_timeout=START,
            heartbeat_timeout_s=1.0,
        ) as ex,
    ):
        ex.collective_rpc(_sleep_holding_the_gil, 600, timeout=120.0)
    assert "asleep" in info.value.state, info.value.state


def _sleep(worker: Worker, seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def test_a_starved_worker_is_not_stuck():
    """A worker that only runs a third of the time (stopped 1 s, running 0.5 s, as on a
    badly overloaded machine) still beats within the timeout: no false alarm."""
    with Executor(
        ParallelConfig(),
        init_distributed=False,
        devices="cpu",
        startup_timeout=START,
        heartbeat_timeout_s=HEARTBEAT,
    ) as ex:
        pid = ex.pids[0]
        done = threading.Event()

        def starve() -> None:
            while not done.is_set():
                os.kill(pid, signal.SIGSTOP)
                time.sleep(1.0)
                os.kill(pid, signal.SIGCONT)
                time.sleep(0.5)

        starver = threading.Thread(target=starve, daemon=True)
        starver.start()
        try:
            assert ex.collective_rpc(_sleep, 4 * HEARTBEAT, timeout=120.0) == [4 * HEARTBEAT]
        finally:
            done.set()
            starver.join()
            os.kill(pid, signal.SIGCONT)


def test_a_rank_that_raises_stops_the_others_within_the_default_grace():
    """The other rank waits in a collective for the failed one; it used to get 30 s."""
    ex = Executor(ParallelConfig(dp=2), devices="cpu", startup_timeout=START)
    pids = list(ex.pids)
    ex.collective_rpc(_hold_the_gil, 0.0, timeout=120.0)  # the workers import this module
    started = time.monotonic()
    with pytest.raises(RemoteError) as info:
        ex.collective_rpc(_fail_then_collective, timeout=120.0)
    elapsed = time.monotonic() - started
    assert info.value.rank == 1 and "ranks [0] were still busy" in str(info.value)
    assert elapsed < ERROR_GRACE_S + 10.0  # the old 30 s grace fails this
    assert not ex.is_alive and all(_gone(p) for p in pids)


# A real Trainer run through VidParStrategy --------------------------------------------


class HangingModel(BoringModel):
    """Rank 1 writes its pid at global step 2, then hangs there (and is SIGSTOPped)."""

    def __init__(self, marker_dir: str) -> None:
        super().__init__()
        self.marker_dir = marker_dir

    def training_step(self, batch, batch_idx):
        if self.global_step == 2 and self.global_rank == 1:
            Path(self.marker_dir, "started-1").write_text(str(os.getpid()))
            while True:
                time.sleep(0.05)
        return super().training_step(batch, batch_idx)


def test_a_stuck_training_worker_names_its_rank_and_step(tmp_path):
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=VidParStrategy(dp=2, heartbeat_timeout_s=HEARTBEAT),
        max_steps=50,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    stopped: list = []

    def stop() -> None:
        deadline = time.monotonic() + 300
        marker = tmp_path / "started-1"
        while not (marker.exists() and marker.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        if marker.exists():
            os.kill(int(marker.read_text()), signal.SIGSTOP)
            stopped.append(time.monotonic())

    stopper = threading.Thread(target=stop, daemon=True)
    stopper.start()
    with pytest.raises(WorkerStuckError) as info:
        trainer.fit(HangingModel(str(tmp_path)))
    stopper.join()
    assert stopped, "rank 1 never reached step 2"
    err = info.value
    assert time.monotonic() - stopped[0] < DETECT_WITHIN
    assert err.rank == 1 and "stopped" in err.state
    assert "training: global step 2" in err.activity
    assert "training_step" in err.stacks
    assert "training: global step" in err.others  # rank 0, waiting in the all-reduce
    assert _gone(int((tmp_path / "started-1").read_text()))


def executor_workers(pid: int) -> list[psutil.Process]:
    """The Executor's workers below process ``pid``: its fork server's children (or the
    processes it spawned, under ``VIDPAR_START_METHOD=spawn``)."""
    workers = []
    for child in psutil.Process(pid).children():
        command = " ".join(child.cmdline())
        if "multiprocessing.forkserver" in command:
            workers += child.children()
        elif "multiprocessing.spawn" in command:
            workers.append(child)
    return workers


def test_a_stopped_vidpar_train_worker_fails_the_run_with_its_rank_and_step(tmp_path):
    """The issue's hang: a SIGSTOPped worker of vidpar-train used to leave the run silent
    for the 30 min collective timeout."""
    overrides = [*TRAIN, f"strategy.heartbeat_timeout_s={HEARTBEAT}", "hydra.run.dir=run"]
    proc, log = start_train(tmp_path, *overrides)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    wait_for(lambda: is_complete(last), 300, "a first checkpoint", proc, log)
    workers = executor_workers(proc.pid)
    assert len(workers) == 2
    workers[1].suspend()  # SIGSTOP
    stopped_at = time.monotonic()
    code = proc.wait(timeout=DETECT_WITHIN + 60)
    console = log.read_text()
    assert code != 0, console[-4000:]
    assert time.monotonic() - stopped_at < DETECT_WITHIN + 30
    assert f"(pid {workers[1].pid}) is stuck" in console, console[-4000:]
    # rank 0's activity: a training step, or the epoch's validation if the stop came then
    assert "global step" in console and "Python stacks of rank" in console, console[-4000:]
    assert _gone(workers[0].pid) and _gone(workers[1].pid)


# GPU ---------------------------------------------------------------------------------


def _matmuls_on_cuda(worker: Worker, seconds: float, marker_dir: str | None = None) -> float:
    """Matmuls on this worker's GPU for ``seconds`` (synchronising each time)."""
    x = torch.randn(2048, 2048, device=worker.device)
    if marker_dir is not None:
        Path(marker_dir, f"started-{worker.rank}").write_text(str(os.getpid()))
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        x = (x @ x).tanh_()
        torch.cuda.synchronize(worker.device)
    return time.monotonic() - started


@pytest.mark.gpu
def test_gpu_worker_busy_is_not_stuck_and_stopped_is_named(tmp_path):
    with Executor(ParallelConfig(), startup_timeout=START, heartbeat_timeout_s=HEARTBEAT) as ex:
        assert ex.collective_rpc(_matmuls_on_cuda, 3 * HEARTBEAT, timeout=120.0)[0] > HEARTBEAT
        stopped: list = []
        stopper = _stop_when_started(tmp_path, 1, 0, stopped)
        with pytest.raises(WorkerStuckError) as info:
            ex.collective_rpc(_matmuls_on_cuda, 600.0, str(tmp_path))
        stopper.join()
    assert info.value.rank == 0 and "_matmuls_on_cuda" in info.value.stacks


# The generators ----------------------------------------------------------------------


def _tiny_generator(kind: str, root: Path):
    """A one-worker generator of ``kind`` with the tests' heartbeat timeout, and its call."""
    from vidpar.models.testing import TINY_WAN, make_tiny_wan
    from vidpar.nn import DiTConfig
    from vidpar.pipelines import DiffusersVideoGenerator, VideoGenerator

    if kind == "dit":
        config = DiTConfig(in_channels=3, hidden_size=32, num_heads=4, depth=1, num_classes=2)
        gen = VideoGenerator(config, devices="cpu", heartbeat_timeout_s=HEARTBEAT)
        return gen, lambda: gen.generate(0, 2, 8, 8, steps=1, show_progress=False)
    gen = DiffusersVideoGenerator(
        make_tiny_wan(root / "wan"), devices="cpu", heartbeat_timeout_s=HEARTBEAT
    )
    prompt = torch.zeros(2, TINY_WAN["text_dim"])
    return gen, lambda: gen.generate(prompt, steps=1, height=4, width=4, show_progress=False)


@pytest.mark.parametrize("kind", ["dit", "diffusers"])
def test_a_generators_heartbeat_timeout_names_its_stopped_worker(kind, tmp_path):
    """Both generators take ``heartbeat_timeout_s`` (they used to keep the minute-long
    default): a SIGSTOPped worker fails the next call within it."""
    gen, generate = _tiny_generator(kind, tmp_path)
    with gen:
        generate()  # the workers work
        (pid,) = gen.executor.pids
        os.kill(pid, signal.SIGSTOP)
        called = time.monotonic()
        with pytest.raises(WorkerStuckError) as info:
            generate()
    assert time.monotonic() - called < HEARTBEAT_TIMEOUT_S / 2
    assert info.value.pid == pid and "stopped" in info.value.state
    assert _gone(pid)
