"""The Executor with real worker processes on CPU: RPCs, tensors, errors, deaths, orphans."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
import torch.distributed as dist

from vidpar import ParallelConfig
from vidpar.distributed import state as ps
from vidpar.executor import (
    Executor,
    ExecutorError,
    RemoteError,
    RpcTimeoutError,
    Worker,
    WorkerDiedError,
    rpc,
)
from vidpar.executor.processes import SHUTDOWN_GRACE_S

#: Generous: the machine is small and shared; latency is measured separately.
START = 120.0
CALL = 60.0


# Functions the workers run (module level, so they pickle by reference) -------------------


class _TestWorker(Worker):
    """A Worker subclass with a stateful RPC."""

    @rpc
    def add(self, amount: int) -> int:
        self.total = getattr(self, "total", 0) + amount
        return self.total


def _make_linear(worker: Worker) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(4, 3).double()


def _scaled_rank(worker: Worker, x: float, *, scale: float = 1.0) -> float:
    return worker.rank * x * scale


def _tp_all_reduce(worker: Worker) -> list[float]:
    tensor = torch.tensor([float(worker.rank + 1), 10.0 * (worker.rank + 1)])
    return ps.get_tp_group().all_reduce(tensor).tolist()


def _plus_rank(worker: Worker, tensor: torch.Tensor) -> torch.Tensor:
    return tensor + worker.rank


def _identity(worker: Worker, obj):
    return obj


def _mutate_then_sum(worker: Worker, tensor: torch.Tensor) -> float:
    if worker.rank == 0:
        tensor.add_(1.0)
    ps.get_world_group().barrier()
    return tensor.sum().item()


def _raise_on(worker: Worker, ranks: list[int]) -> int:
    if worker.rank in ranks:
        raise ValueError(f"boom on rank {worker.rank}")
    return worker.rank


def _unpicklable_result(worker: Worker):
    return threading.Lock()


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


# Helpers -----------------------------------------------------------------------------


def _children() -> set[int]:
    """Live child processes of this test process (multiprocessing's resource tracker aside)."""
    pids = set()
    for child in psutil.Process().children(recursive=True):
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                continue
            if any("resource_tracker" in part for part in child.cmdline()):
                continue
        except psutil.NoSuchProcess:
            continue
        pids.add(child.pid)
    return pids


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _assert_no_leftovers(before: set[int], pids: list[int]) -> None:
    assert all(_gone(p) for p in pids), [p for p in pids if not _gone(p)]
    assert _children() - before == set()


@pytest.fixture(scope="module")
def executor():
    """Two workers in a tp=2 layout, each holding a small float64 Linear."""
    with Executor(
        ParallelConfig(tp=2),
        worker_factory=_make_linear,
        worker_cls=_TestWorker,
        devices="cpu",
        startup_timeout=START,
    ) as ex:
        yield ex


# RPCs and results --------------------------------------------------------------------


def test_results_come_in_rank_order(executor):
    assert executor.collective_rpc("ping", timeout=CALL) == [0, 1]
    assert executor.collective_rpc("ping", ranks=[1], timeout=CALL) == [1]
    assert executor.collective_rpc("ping", ranks=(1, 0), timeout=CALL) == [0, 1]
    assert executor.collective_rpc(_scaled_rank, 3.0, scale=2.0, timeout=CALL) == [0.0, 6.0]
    assert executor.collective_rpc(_scaled_rank, 5.0, ranks=[1]) == [5.0]


def test_bad_ranks_are_rejected_before_sending(executor):
    with pytest.raises(ValueError, match="distinct integers"):
        executor.collective_rpc("ping", ranks=[2])
    with pytest.raises(ValueError, match="distinct integers"):
        executor.collective_rpc("ping", ranks=[0, 0])
    assert executor.collective_rpc("ping", timeout=CALL) == [0, 1]


def test_worker_state_persists_between_calls(executor):
    first = executor.collective_rpc("add", 2, timeout=CALL)
    second = executor.collective_rpc("add", 3, timeout=CALL)
    assert [b - a for a, b in zip(first, second, strict=True)] == [3, 3]
    assert executor.collective_rpc("add", 0, ranks=[1], timeout=CALL) == [second[1]]


def test_callable_uses_the_tp_group(executor):
    assert executor.collective_rpc(_tp_all_reduce, timeout=CALL) == [[3.0, 30.0]] * 2


def test_execute_forward_matches_a_local_model(executor):
    model = _make_linear(None)
    x = torch.randn(5, 4, dtype=torch.float64)
    expected = model(x).detach()
    for batch in ({"input": x}, (x,)):
        outputs = executor.collective_rpc("execute_forward", batch, timeout=CALL)
        for out in outputs:
            assert not out.requires_grad
            torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_load_weights_into_the_payload(executor, tmp_path):
    pytest.importorskip("vidpar.nn.linear")
    from safetensors.torch import save_file

    x = torch.randn(2, 4, dtype=torch.float64)
    try:
        for seed, name in ((1, "linear.safetensors"), (2, "linear.pt")):
            torch.manual_seed(seed)
            other = torch.nn.Linear(4, 3).double()
            path = tmp_path / name
            if name.endswith(".pt"):
                torch.save(other.state_dict(), path)
            else:
                save_file(other.state_dict(), path)
            executor.collective_rpc("load_weights", str(path), timeout=CALL)
            for out in executor.collective_rpc("execute_forward", (x,), timeout=CALL):
                torch.testing.assert_close(out, other(x).detach(), rtol=0, atol=0)
    finally:  # restore the fixture's weights (as a state dict) for the other tests
        executor.collective_rpc("load_weights", _make_linear(None).state_dict(), timeout=CALL)
    reference = _make_linear(None)(x).detach()
    for out in executor.collective_rpc("execute_forward", (x,), timeout=CALL):
        torch.testing.assert_close(out, reference, rtol=0, atol=0)


def test_64_mib_tensor_round_trip(executor):
    tensor = torch.randn(16 * 1024 * 1024)  # 64 MiB of float32
    original = tensor.clone()
    results = executor.collective_rpc(_plus_rank, tensor, timeout=CALL)
    assert torch.equal(tensor, original)
    for rank, result in enumerate(results):
        assert result.shape == tensor.shape and result.dtype == tensor.dtype
        assert torch.equal(result, original + rank)


def test_many_kinds_of_values_cross_intact(executor):
    values = {
        "bf16": torch.randn(300, 300).bfloat16(),  # 180 KB: through shared memory
        "transposed": torch.randn(200, 300).t(),
        "scalar": torch.tensor(3.5, dtype=torch.float64),
        "empty": torch.empty(0, 7),
        "bool": torch.rand(100_000) > 0.5,
        "int": torch.arange(10, dtype=torch.int64),
        "grad": torch.randn(3, requires_grad=True),
        "param": torch.nn.Parameter(torch.randn(2, 2)),
        "complex": torch.randn(4, dtype=torch.complex64),
        "numpy": np.arange(50_000, dtype=np.float64),
        "bytes": os.urandom(300_000),  # a big pickle: it travels through shared memory
        "nested": [1, "two", (3.0, None)],
    }
    back = executor.collective_rpc(_identity, values, ranks=[1], timeout=CALL)[0]
    assert back.keys() == values.keys()
    for key, value in values.items():
        if isinstance(value, torch.Tensor):
            assert type(back[key]) is type(value), key
            assert back[key].dtype == value.dtype and back[key].requires_grad == value.requires_grad
            assert torch.equal(back[key].detach(), value.detach()), key
        elif isinstance(value, np.ndarray):
            np.testing.assert_array_equal(back[key], value)
        else:
            assert back[key] == value, key


def test_workers_get_private_copies_of_shared_tensors(executor):
    tensor = torch.ones(512 * 1024, dtype=torch.float64)  # 4 MiB: through shared memory
    sums = executor.collective_rpc(_mutate_then_sum, tensor, timeout=CALL)
    assert sums == [2.0 * tensor.numel(), float(tensor.numel())]
    assert torch.equal(tensor, torch.ones_like(tensor))


# Errors that leave the Executor usable --------------------------------------------------


def test_remote_exception_carries_rank_type_and_traceback(executor):
    with pytest.raises(RemoteError) as info:
        executor.collective_rpc(_raise_on, [1], timeout=CALL)
    err = info.value
    assert err.rank == 1 and err.exc_type == "ValueError"
    assert "_raise_on" in err.remote_traceback and "boom on rank 1" in err.remote_traceback
    assert isinstance(err.exception, ValueError)
    assert list(err.errors) == [1]
    assert isinstance(pickle.loads(pickle.dumps(err)), RemoteError)
    assert executor.collective_rpc("ping", timeout=CALL) == [0, 1]

    with pytest.raises(RemoteError) as info:
        executor.collective_rpc(_raise_on, [0, 1], timeout=CALL)
    assert info.value.rank == 0 and sorted(info.value.errors) == [0, 1]
    assert executor.collective_rpc("ping", timeout=CALL) == [0, 1]


def test_missing_method_and_unpicklable_values(executor):
    with pytest.raises(RemoteError) as info:
        executor.collective_rpc("no_such_rpc", timeout=CALL)
    assert info.value.exc_type == "AttributeError"
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        executor.collective_rpc(lambda worker: 1)  # fails in the caller; nothing is sent
    with pytest.raises(RemoteError) as info:
        executor.collective_rpc(_unpicklable_result, timeout=CALL)
    assert info.value.exc_type == "PicklingError"
    with pytest.raises(RemoteError) as info:
        executor.collective_rpc("execute_forward", {"wrong": torch.ones(1)}, timeout=CALL)
    assert info.value.exc_type == "TypeError"
    assert executor.collective_rpc("ping", timeout=CALL) == [0, 1]
    assert executor.is_alive


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


# GPU ---------------------------------------------------------------------------------


def _cuda_report(worker: Worker, x: torch.Tensor) -> dict:
    y = worker.model(x.to(worker.device))
    return {
        "device": str(y.device),
        "current": torch.cuda.current_device(),
        "backend": dist.get_backend(),
        "y": y,
    }


def _make_cuda_linear(worker: Worker) -> torch.nn.Module:
    return _make_linear(worker).to(worker.device)


@pytest.mark.gpu
def test_cuda_workers_use_their_device_and_send_cpu_tensors():
    world = min(torch.cuda.device_count(), 2)
    config = ParallelConfig(dp=world)
    x = torch.randn(8, 4, dtype=torch.float64)
    with Executor(config, worker_factory=_make_cuda_linear, startup_timeout=START) as ex:
        assert ex.devices == [f"cuda:{i}" for i in range(world)]
        reports = ex.collective_rpc(_cuda_report, x, timeout=CALL)
        outputs = ex.collective_rpc("execute_forward", (x,), timeout=CALL)
        big = torch.randn(16 * 1024 * 1024)
        assert all(torch.equal(r, big) for r in ex.collective_rpc(_identity, big, timeout=CALL))
    expected = _make_linear(None)(x).detach()
    for rank, (report, out) in enumerate(zip(reports, outputs, strict=True)):
        assert report["device"] == f"cuda:{rank}" and report["current"] == rank
        assert report["backend"] == "nccl"
        assert report["y"].device.type == "cpu" and out.device.type == "cpu"
        torch.testing.assert_close(out, expected)
