"""The Executor with real worker processes on CPU: RPCs, tensors, errors, deaths, orphans."""

from __future__ import annotations

import os
import pickle
import threading

import numpy as np
import psutil
import pytest
import torch
import torch.distributed as dist

from vidpar import ParallelConfig
from vidpar.distributed import state as ps
from vidpar.executor import (
    Executor,
    RemoteError,
    Worker,
    rpc,
    shared_buffers,
    wire,
)
from vidpar.executor.shared_buffers import shared_empty
from vidpar.executor.worker import rpc_names

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


def _shared_frames(worker: Worker, numel: int) -> np.ndarray:
    """Frames written straight into shared memory, handed back as a numpy array."""
    frames = shared_empty((numel,), torch.float32)
    frames.fill_(worker.rank + 0.5)
    return frames.numpy()


def _live_shared_buffers(worker: Worker) -> int:
    return shared_buffers.live_shared_buffers()


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


# Helpers -----------------------------------------------------------------------------


#: multiprocessing's helpers that serve every Executor of the process, and outlive them.
_SHARED_HELPERS = ("resource_tracker", "multiprocessing.forkserver")


def _children() -> set[int]:
    """Live child processes of this test process (multiprocessing's resource tracker and
    the workers' fork server aside)."""
    pids = set()
    for child in psutil.Process().children(recursive=True):
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                continue
            if any(k in part for part in child.cmdline() for k in _SHARED_HELPERS):
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


def test_a_workers_shared_buffer_comes_back_without_a_copy(executor):
    numel = 1 << 20
    results = executor.collective_rpc(_shared_frames, numel, timeout=CALL)
    for rank, frames in enumerate(results):
        assert frames.dtype == np.float32 and frames.shape == (numel,)
        assert (frames == rank + 0.5).all()
        assert frames.flags.writeable
        frames[0] = -1.0  # the caller's own (copy-on-write)
    assert wire.last_times["decode_end"] >= wire.last_times["decode_start"]
    # the workers let go of their buffers once sent (the caller's arrays keep the pages)
    assert executor.collective_rpc(_live_shared_buffers, timeout=CALL) == [0, 0]


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


def test_shutdown_is_the_executors_not_an_rpc(executor):
    """One door: ``collective_rpc("shutdown")`` is refused (nothing is sent, the workers
    stay up) and points at ``Executor.shutdown()``; workers offer no shutdown RPC."""
    with pytest.raises(ValueError, match=r"Executor\.shutdown\(\)"):
        executor.collective_rpc("shutdown")
    assert "shutdown" not in rpc_names(_TestWorker)
    assert executor.is_alive
    assert executor.collective_rpc("ping", timeout=CALL) == [0, 1]


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
