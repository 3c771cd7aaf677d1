"""A group of one keeps the promise of GroupCoordinator's docstring for every op: its
collectives return their input, its send/recv are an in-order loopback to itself."""

from __future__ import annotations

import pytest
import torch

from vidpar.config import ParallelConfig
from vidpar.distributed import state as ps


def loopback_on_a_group_of_one() -> bool:
    group = ps.get_cfg_group()  # one rank in a tp2 world (or in no world at all)
    assert group.world_size == 1
    x, y = torch.randn(2, 3), torch.arange(4)
    sent = x.clone()
    group.send(x)
    group.send(y, dst=0)
    x.add_(1)  # what was sent is a copy: later changes do not arrive
    assert torch.equal(group.recv((2, 3), x.dtype), sent)
    assert torch.equal(group.recv((4,), y.dtype, src=0), y)
    group.send_object({"a": 1})
    group.send_object("b")
    assert group.recv_object() == {"a": 1} and group.recv_object(src=0) == "b"
    with pytest.raises(RuntimeError, match="nothing was sent to this rank"):
        group.recv((2, 3), x.dtype)
    with pytest.raises(RuntimeError, match="nothing was sent to this rank"):
        group.recv_object()
    group.send(x)
    with pytest.raises(RuntimeError, match=r"expected \(3, 2\)"):
        group.recv((3, 2), x.dtype)
    for op, call in {
        "send": lambda: group.send(x, dst=1),
        "recv": lambda: group.recv((2,), x.dtype, src=1),
        "send_object": lambda: group.send_object(1, dst=1),
        "recv_object": lambda: group.recv_object(src=1),
        "gather": lambda: group.gather(x, dst=1),
        "broadcast": lambda: group.broadcast(x, src=1),
        "broadcast_object": lambda: group.broadcast_object(1, src=1),
        "broadcast_tensor_dict": lambda: group.broadcast_tensor_dict({}, src=1),
    }.items():
        with pytest.raises(ValueError, match=f"{op}: rank 1 is not in group 'cfg' of 1 rank"):
            call()
    assert group.gather(x) is x and group.reduce_scatter(x) is x
    assert group.all_to_all(x, 0, 1) is x and group.broadcast_tensor_dict({"x": x})["x"] is x
    group.barrier()
    return True


def test_a_group_of_one_without_a_world_loops_back() -> None:
    assert loopback_on_a_group_of_one()


def test_a_group_of_one_inside_a_world_loops_back(worlds) -> None:
    assert all(worlds(2).run(loopback_on_a_group_of_one, layout=ParallelConfig(tp=2)))
