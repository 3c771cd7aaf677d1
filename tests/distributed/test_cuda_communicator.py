"""The CUDA communicator: the per-call choice between torch's NCCL and pynccl (a pure
function, tested on CPU), ``create_communicator`` for every ``communicator`` value, the
CudaCommunicator's shaping and routing in a real gloo world, and on one GPU every value
through a world-1 group, its log line and the choice under CUDA-graph capture."""

from __future__ import annotations

import logging

import pytest
import torch
from torch.distributed import ReduceOp

from vidpar.distributed import state as ps
from vidpar.distributed.device_communicators import (
    KINDS,
    CudaCommunicator,
    DeviceCommunicator,
    create_communicator,
)
from vidpar.distributed.device_communicators import cuda as cc

SMALL, LARGE = cc.SMALL_MESSAGE_BYTES, cc.SMALL_MESSAGE_BYTES + 1


def _path(prefer, op="all_reduce", nbytes=SMALL, world=2, capturing=False, ready=True, **kw):
    return cc.choose_path(prefer, op, nbytes, world, capturing, ready, **kw).path


def test_torch_and_pynccl_force_their_path() -> None:
    for op in cc.PYNCCL_OPS:
        for nbytes in (1, SMALL, 1 << 30):
            for capturing in (False, True):
                assert _path("torch", op, nbytes, 8, capturing) == "torch"
                assert _path("pynccl", op, nbytes, 8, capturing) == "pynccl"
                # pynccl cannot take the call (not loaded, or not its dtype): torch
                assert _path("pynccl", op, nbytes, 8, capturing, ready=False) == "torch"
    assert cc.choose_path("pynccl", "gather", 1, 2, False, True) == (
        "torch",
        "pynccl has no gather",
    )


def test_auto_keeps_multi_rank_pynccl_off_until_validated() -> None:
    for op in cc.OPS:
        for nbytes, capturing in ((1, False), (SMALL, True), (LARGE, False)):
            choice = cc.choose_path("auto", op, nbytes, 2, capturing, True)
            assert choice.path == "torch", (op, nbytes, capturing)
    assert cc.choose_path("auto", "all_reduce", 1, 2, True, True).reason == cc.NOT_VALIDATED
    assert "multi-rank pynccl and symmetric memory" in cc.NOT_VALIDATED


@pytest.mark.parametrize("world", [1, 4])
def test_auto_by_size_and_capture_where_validated(world: int) -> None:
    validated = frozenset({"pynccl"})  # world 1 needs no validation of multi-rank paths
    kw = {"world": world, "validated": validated}
    assert _path("auto", nbytes=SMALL, **kw) == "pynccl"
    assert _path("auto", nbytes=LARGE, **kw) == "torch"
    assert _path("auto", nbytes=LARGE, capturing=True, **kw) == "pynccl"
    assert _path("auto", nbytes=1, ready=False, **kw) == "torch"
    assert _path("auto", "gather", nbytes=1, **kw) == "torch"
    assert _path("auto", nbytes=64, small_bytes=32, **kw) == "torch"
    assert _path("auto", nbytes=1, world=1) == "pynccl"  # the default: nothing validated


def test_bad_names_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown operation"):
        cc.choose_path("auto", "allreduce", 1, 2, False, True)
    with pytest.raises(ValueError, match="prefer must be one of"):
        cc.choose_path("symm", "all_reduce", 1, 2, False, True)


def test_who_builds_pynccl() -> None:
    assert cc.wants_pynccl("pynccl", 8)
    assert cc.wants_pynccl("auto", 1)
    assert not cc.wants_pynccl("auto", 2)
    assert cc.wants_pynccl("auto", 2, frozenset({"pynccl"}))
    assert not cc.wants_pynccl("torch", 1)


def test_the_plan_line_names_each_path_and_why() -> None:
    multi = cc.describe_plan("auto", 2, False)
    assert multi.startswith("torch: all_reduce, all_gather, reduce_scatter, all_to_all, ")
    assert "gather" in multi and cc.NOT_VALIDATED in multi and "pynccl:" not in multi
    single = cc.describe_plan("auto", 1, True)
    mixed = f"pynccl up to {SMALL} B, torch above, pynccl under capture: all_reduce, "
    assert single.startswith(mixed)
    assert "torch: gather" in single and "small message" in single
    forced = cc.describe_plan("pynccl", 4, True)
    assert forced.startswith("pynccl: all_reduce, all_gather, reduce_scatter, all_to_all, ")
    assert "torch: gather" in forced


def test_symm_is_an_error_and_pynccl_on_cpu_falls_back() -> None:
    assert KINDS == ("auto", "torch", "pynccl", "symm")
    with pytest.raises(ValueError, match=r"'symm' .* is not available yet"):
        create_communicator("symm", None, None, [0, 1], 0, torch.device("cpu"))
    comm = create_communicator("torch", None, None, [0, 1], 0, torch.device("cpu"))
    assert comm.name == "gloo"


# A real gloo world: the shaping of the base class and the routing of CudaCommunicator ---


def _agree(flags: list[bool]) -> bool:
    group = ps.get_world_group()
    return cc._all_agree(flags[group.rank_in_group], group.cpu_group)


def test_ranks_agree_only_when_all_can(worlds) -> None:
    assert worlds(2).run(_agree, [True, True]) == [True, True]
    assert worlds(2).run(_agree, [True, False]) == [False, False]


def _every_op_through(prefer: str) -> list[str]:
    """CudaCommunicator's routing, with CPU tensors (gloo), against single-process math."""
    group = ps.get_world_group()
    comm = CudaCommunicator(
        group.cpu_group,
        group.device_group,
        group.ranks,
        group.rank_in_group,
        group.device,
        prefer=prefer,
    )
    assert comm.pynccl is None
    n, me = comm.world_size, comm.rank_in_group
    xs = [torch.arange(24.0).reshape(2 * n, 3, 2) * (r + 1) for r in range(n)]
    x = xs[me]
    paths = [comm.path("all_reduce", x, 96, ReduceOp.SUM), comm.path("gather", x, 96)]
    assert torch.equal(comm.all_reduce(x.clone()), sum(xs))
    assert torch.equal(comm.all_reduce(x.clone(), ReduceOp.MAX), xs[-1])
    assert torch.equal(comm.all_gather(x, 1), torch.cat(xs, 1))
    assert torch.equal(comm.reduce_scatter(x.clone(), 0), sum(xs).chunk(n, 0)[me])
    expect = torch.cat([xj.chunk(n, 0)[me] for xj in xs], 2)
    assert torch.equal(comm.all_to_all(x, 0, 2), expect)
    assert torch.equal(comm.broadcast(x.clone(), n - 1), xs[-1])
    gathered = comm.gather(x, 0, 1)
    assert gathered is None if me else torch.equal(gathered, torch.cat(xs, 1))
    if me == 0:
        comm.send(x, 1)
    else:
        assert torch.equal(comm.recv(torch.empty_like(x), 0), xs[0])
    comm.close()
    return paths


@pytest.mark.parametrize("prefer", ["auto", "torch"])
def test_every_op_routes_through_the_base_primitives(worlds, prefer: str) -> None:
    assert worlds(2).run(_every_op_through, prefer) == [["torch", "torch"]] * 2


# One GPU: every communicator value on a world-1 group ------------------------------------


def _ops_round_trip(comm: DeviceCommunicator) -> None:
    x = torch.randn(4, 6, 2, device="cuda")
    assert torch.equal(comm.all_reduce(x.clone()), x)
    assert torch.equal(comm.all_gather(x, 1), x)
    assert torch.equal(comm.reduce_scatter(x.clone(), 1), x)
    assert torch.equal(comm.all_to_all(x, 1, 2), x)
    assert torch.equal(comm.broadcast(x.clone(), 0), x)
    assert torch.equal(comm.gather(x, 0, 1), x)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
def test_create_communicator_on_cuda_for_each_value(one_rank_world, kind: str, caplog) -> None:
    caplog.set_level(logging.INFO, logger=cc.__name__)
    device = torch.device("cuda", 0)
    args = (one_rank_world, one_rank_world, [0], 0, device)
    if kind == "symm":
        with pytest.raises(ValueError, match="not available yet"):
            create_communicator(kind, *args)
        return
    comm = create_communicator(kind, *args)
    try:
        assert isinstance(comm, CudaCommunicator) == (kind != "torch")
        _ops_round_trip(comm)
        if kind == "torch":
            return
        assert comm.pynccl is not None, caplog.text
        x = torch.zeros(16, device="cuda")
        big = torch.zeros(2 * SMALL // 4, device="cuda")
        assert comm.path("all_reduce", x, 64) == "pynccl"
        assert comm.path("all_reduce", big, 2 * SMALL) == ("torch" if kind == "auto" else "pynccl")
        assert comm.path("gather", x, 64) == "torch"
        lines = [r.getMessage() for r in caplog.records if r.name == cc.__name__]
        assert len(lines) == 1 and f"communicator for ranks [0] on cuda:0 ({kind})" in lines[0]
    finally:
        comm.close()


def _graph_step(comm, x):
    y = comm.all_reduce(x * 3)
    gathered = comm.all_gather(y.view(4, -1), 1)
    return comm.all_to_all(gathered, 1, 0) + 1


@pytest.mark.gpu
def test_auto_takes_pynccl_under_capture(one_rank_world) -> None:
    device = torch.device("cuda", 0)
    comm = create_communicator("auto", one_rank_world, one_rank_world, [0], 0, device)
    try:
        x = torch.randn(2 * SMALL // 4, device="cuda")  # large: torch's NCCL unless capturing
        assert comm.path("all_reduce", x, 2 * SMALL) == "torch"
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            eager = _graph_step(comm, x)
            comm.pynccl.all_reduce(x.clone())  # pynccl's first call, before the capture
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()  # nothing of torch's NCCL left in flight during capture
        graph, seen = torch.cuda.CUDAGraph(), []
        with torch.cuda.graph(graph):
            seen.append(comm.path("all_reduce", x, 2 * SMALL))
            out = _graph_step(comm, x)
        assert seen == ["pynccl"]
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, eager)
        x.mul_(-1)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, _graph_step(comm, x))
        del graph  # NCCL waits for the graphs that captured a communicator's work
        torch.cuda.synchronize()
    finally:
        comm.close()
