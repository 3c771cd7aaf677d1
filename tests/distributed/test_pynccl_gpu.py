"""pynccl on one GPU: world-1 communicators for every op × dtype × size from one element
to 64 MiB against torch's NCCL (with guard bytes after every output), a mixed sequence of
ops captured in one CUDA graph and replayed, ops on the caller's stream, destroy/abort/
re-create in one process, and bad calls refused before NCCL sees them."""

from __future__ import annotations

import gc

import pytest
import torch
from torch.distributed import ReduceOp

from vidpar.distributed.device_communicators import nccl_library as nl
from vidpar.distributed.device_communicators import pynccl
from vidpar.distributed.device_communicators.base import DeviceCommunicator
from vidpar.distributed.device_communicators.pynccl import PyNcclCommunicator

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def comm(one_rank_world):
    communicator = PyNcclCommunicator(one_rank_world, [0], 0, torch.device("cuda", 0))
    yield communicator
    communicator.close()


@pytest.fixture(scope="module")
def torch_nccl(one_rank_world):
    return DeviceCommunicator(one_rank_world, one_rank_world, [0], 0, torch.device("cuda", 0))


DTYPES = list(nl.DTYPES)
FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
GUARD = 16  # elements after every output, which no op may touch
SENTINEL = 0xA5


def _sizes(dtype: torch.dtype) -> list[int]:
    """Element counts from one to 64 MiB, most of them not a multiple of 16 bytes."""
    size = torch.empty((), dtype=dtype).element_size()
    return [1, 3, 1007, (1 << 20) // size + 1, (64 << 20) // size]


def _data(n: int, dtype: torch.dtype) -> torch.Tensor:
    if dtype.is_floating_point:
        x = torch.randn(n, device="cuda").clamp_(-8, 8)
        return x.to(dtype)
    high = 100 if dtype != torch.uint8 else 256
    return torch.randint(0 if dtype == torch.uint8 else -high, high, (n,), device="cuda").to(dtype)


def _guarded(n: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(raw bytes, a view of its first ``n`` elements); everything starts as SENTINEL."""
    size = torch.empty((), dtype=dtype).element_size()
    raw = torch.full(((n + GUARD) * size,), SENTINEL, dtype=torch.uint8, device="cuda")
    return raw, raw.view(dtype)[:n]


def _untouched_tail(raw: torch.Tensor, n: int, dtype: torch.dtype) -> bool:
    size = torch.empty((), dtype=dtype).element_size()
    return bool((raw[n * size :] == SENTINEL).all())


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.uint8)


def _torch_result(torch_nccl, op: str, x: torch.Tensor, reduce_op) -> torch.Tensor | None:
    """torch's NCCL result for one rank, or ``None`` where torch refuses the dtype or op
    (fp8 reductions in some releases); one rank's result is also its own data."""
    calls = {
        "all_reduce": lambda: torch_nccl.all_reduce(x.clone(), reduce_op),
        "all_gather": lambda: torch_nccl.all_gather(x, 0),
        "reduce_scatter": lambda: torch_nccl.reduce_scatter(x.clone(), 0, reduce_op),
        "all_to_all": lambda: torch_nccl.all_to_all(x, 0, 0),
        "broadcast": lambda: torch_nccl.broadcast(x.clone(), 0),
    }
    try:
        return calls[op]()
    except (RuntimeError, ValueError, TypeError):
        return None


def _run_pynccl(comm, op: str, x: torch.Tensor, out: torch.Tensor, reduce_op=ReduceOp.SUM):
    if op == "all_reduce":
        comm.all_reduce(x, out=out, op=reduce_op)
    elif op == "all_gather":
        comm.all_gather(out, x)
    elif op == "reduce_scatter":
        comm.reduce_scatter(out, x, reduce_op)
    elif op == "all_to_all":
        comm.all_to_all(out, x)
    elif op == "broadcast":
        out.copy_(x)
        comm.broadcast(out, 0)
    else:  # send/recv, to itself: one group
        with comm.group():
            comm.send(x, 0)
            comm.recv(out, 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "op", ["all_reduce", "all_gather", "reduce_scatter", "all_to_all", "broadcast", "send_recv"]
)
def test_every_op_dtype_and_size_matches_torch(comm, torch_nccl, op: str, dtype) -> None:
    torch.manual_seed(0)
    reduce_ops = [ReduceOp.SUM]
    if op in ("all_reduce", "reduce_scatter"):
        reduce_ops += [ReduceOp.PRODUCT, ReduceOp.MAX, ReduceOp.MIN]
        if dtype not in FP8:  # NCCL's one-rank path has no fp8 pre-multiply (onerank.cu)
            reduce_ops.append(ReduceOp.AVG)
    compared_with_torch = 0
    for n in _sizes(dtype):
        x = _data(n, dtype)
        for reduce_op in reduce_ops if n < 4096 else [ReduceOp.SUM]:
            raw, out = _guarded(n, dtype)
            _run_pynccl(comm, op, x, out, reduce_op)
            assert torch.equal(_bits(out), _bits(x)), (op, dtype, n, reduce_op)  # one rank
            assert _untouched_tail(raw, n, dtype), (op, dtype, n, "wrote past the end")
            torch_op = "broadcast" if op == "send_recv" else op
            expect = _torch_result(torch_nccl, torch_op, x, reduce_op)
            if expect is not None:
                assert torch.equal(_bits(out), _bits(expect)), (op, dtype, n, "vs torch")
                compared_with_torch += 1
    assert compared_with_torch or dtype in FP8, "torch's NCCL refused every call"
    # in place, as the communicator is used by vidpar
    x = _data(1007, dtype)
    before = x.clone()
    comm.all_reduce(x)
    comm.broadcast(x, 0)
    assert torch.equal(_bits(x), _bits(before))


def _mixed_step(comm, x, bufs):
    y = x * 2
    comm.all_reduce(y)
    comm.all_gather(bufs["gathered"], y)
    comm.reduce_scatter(bufs["scattered"], bufs["gathered"], ReduceOp.MAX)
    comm.all_to_all(bufs["exchanged"], bufs["scattered"])
    comm.broadcast(bufs["exchanged"], 0)
    with comm.group():
        comm.send(bufs["exchanged"], 0)
        comm.recv(bufs["received"], 0)
    return bufs["received"] + 1


def test_a_mixed_sequence_captured_in_one_cuda_graph_replays(comm) -> None:
    x = torch.randn(4099, device="cuda")
    bufs = {k: torch.empty_like(x) for k in ("gathered", "scattered", "exchanged", "received")}
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up off the default stream, as torch's docs advise
        eager = _mixed_step(comm, x, bufs)
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(eager, x * 2 + 1)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = _mixed_step(comm, x, bufs)
    for seed in (1, 2):
        x.copy_(torch.randn(4099, generator=torch.Generator().manual_seed(seed)))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured, x * 2 + 1), seed


def test_ops_run_on_the_callers_stream(comm) -> None:
    """An op on a side stream finishes while the default stream is still busy, and an op
    on the default stream waits for the work queued before it there."""
    n = 1 << 16
    x, out = torch.full((n,), 3.0, device="cuda"), torch.zeros(n, device="cuda")
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):  # first use of the stream, outside the timing
        comm.all_reduce(x, out=out)
    torch.cuda.synchronize()
    out.zero_()
    torch.cuda._sleep(400_000_000)  # ~0.2 s of GPU time on the default stream
    with torch.cuda.stream(side):
        comm.all_reduce(x, out=out)
    side.synchronize()
    assert not torch.cuda.current_stream().query(), "the default stream finished too soon"
    assert bool((out == 3).all())
    torch.cuda._sleep(100_000_000)
    x.fill_(5.0)  # queued behind the sleep, on the default stream
    comm.all_reduce(x, out=out)
    torch.cuda.synchronize()
    assert bool((out == 5).all())


def test_destroy_abort_and_recreate_in_one_process(one_rank_world) -> None:
    device = torch.device("cuda", 0)
    x = torch.arange(10.0, device=device)
    for abort in (False, True, False):
        c = PyNcclCommunicator(one_rank_world, [0], 0, device)
        assert torch.equal(c.all_reduce(x.clone()), x)
        torch.cuda.synchronize()
        c.close(abort=abort)
        assert c.closed
        c.close()  # idempotent
        with pytest.raises(RuntimeError, match="closed"):
            c.all_reduce(x)
    dropped = PyNcclCommunicator(one_rank_world, [0], 0, device)
    dropped.all_reduce(x.clone())
    torch.cuda.synchronize()
    assert dropped in pynccl._OPEN  # aborted at interpreter exit if still open then
    still_open = len(pynccl._OPEN)
    del dropped  # never closed: destroyed when collected
    gc.collect()
    assert len(pynccl._OPEN) == still_open - 1
    again = PyNcclCommunicator(one_rank_world, [0], 0, device)
    assert torch.equal(again.all_reduce(x.clone()), x)
    again.close()


def test_bad_calls_are_refused_before_nccl(comm) -> None:
    x = torch.zeros(8, device="cuda")
    with pytest.raises(ValueError, match="contiguous"):
        comm.all_reduce(torch.zeros(8, 2, device="cuda").t())
    with pytest.raises(ValueError, match=r"has no torch\.bool"):
        comm.all_reduce(torch.zeros(8, dtype=torch.bool, device="cuda"))
    with pytest.raises(ValueError, match="expected 8"):
        comm.all_gather(torch.zeros(9, device="cuda"), x)
    with pytest.raises(ValueError, match="not in a group of 1"):
        comm.broadcast(x, 1)
    with pytest.raises(ValueError, match="got a tensor on cpu"):
        comm.all_reduce(torch.zeros(8))
    assert not comm.supports(torch.zeros(8, dtype=torch.complex64, device="cuda"))
    assert not comm.supports(x, ReduceOp.BAND)
    assert comm.supports(x, ReduceOp.AVG)


EXIT_WITH_AN_OPEN_COMMUNICATOR = """
import torch, torch.distributed as dist
from vidpar.distributed.device_communicators import pynccl
dist.init_process_group("cpu:gloo,cuda:nccl", store=dist.HashStore(), rank=0, world_size=1)
comm = pynccl.PyNcclCommunicator(dist.group.WORLD, [0], 0, torch.device("cuda", 0))
x = comm.all_reduce(torch.ones(1 << 20, device="cuda"))
print("open:", len(pynccl._OPEN), float(x.sum()))
"""


def test_a_process_exits_with_a_communicator_left_open() -> None:
    """The exit path aborts what is still open: the interpreter leaves without hanging."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", EXIT_WITH_AN_OPEN_COMMUNICATOR],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "open: 1 1048576.0" in proc.stdout
