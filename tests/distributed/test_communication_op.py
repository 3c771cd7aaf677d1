"""Autograd collectives: forward and gradients against a single-process emulation of the
whole group (float64, exact up to summation order)."""

from __future__ import annotations

import pytest
import torch

from vidpar.config import ParallelConfig
from vidpar.distributed import communication_op as comm
from vidpar.distributed import state as ps
from vidpar.distributed.utils import pad_to_multiple

GROUPS = ["tp", "sp", "ulysses", "ring", "dp"]


def data(tag: int, rank: int, shape) -> torch.Tensor:
    gen = torch.Generator().manual_seed(tag * 100 + rank)
    return torch.randn(shape, generator=gen, dtype=torch.float64)


def local_and_emulated(name: str, op, emulate, shape, replicated_weight: bool, **kw):
    """Run ``op`` on this rank and ``emulate`` over all members in one process.

    The loss on rank r is <w_r, out_r>. For ops whose output is replicated (the model after
    them runs identically everywhere) every rank uses the same w and the total loss counts
    it once; otherwise the total loss is the sum over ranks. ``copy_to_group``'s input is
    replicated by contract: one tensor shared by every rank of the emulation.
    """
    group = ps.get_parallel_state().group(name)
    n, me = group.world_size, group.rank_in_group
    if op is comm.copy_to_group:
        xs = [data(1, 0, shape).requires_grad_()] * n
    else:
        xs = [data(1, r, shape).requires_grad_() for r in group.ranks]
    x = xs[me].detach().clone().requires_grad_()
    out = op(x, group, **kw)
    ws = [data(2, 0 if replicated_weight else r, out.shape) for r in group.ranks]
    (out * ws[me]).sum().backward()

    outs = emulate(xs, n, **kw)
    total = (
        (outs[0] * ws[0]).sum()
        if replicated_weight
        else sum((o * w).sum() for o, w in zip(outs, ws, strict=True))
    )
    total.backward()
    return out, outs[me], x.grad, xs[me].grad


def check_autograd_ops() -> int:
    checks = 0
    for name in GROUPS:
        cases = [
            (comm.copy_to_group, lambda xs, n: list(xs), (3, 4), False, {}),
            (comm.reduce_from_group, lambda xs, n: [sum(xs)] * n, (3, 4), True, {}),
            (
                comm.gather_from_group,
                lambda xs, n, dim: [torch.cat(xs, dim)] * n,
                (2, 3, 4),
                True,
                {"dim": 1},
            ),
            (
                comm.all_to_all,
                lambda xs, n, scatter_dim, gather_dim: [
                    torch.cat([x.chunk(n, scatter_dim)[i] for x in xs], gather_dim)
                    for i in range(n)
                ],
                (2, 4, 8, 3),
                False,
                {"scatter_dim": 2, "gather_dim": 1},
            ),
        ]
        for op, emulate, shape, replicated, kw in cases:
            out, expect, grad, expect_grad = local_and_emulated(
                name, op, emulate, shape, replicated, **kw
            )
            assert torch.allclose(out, expect, atol=1e-12, rtol=0), (name, op.__name__)
            assert torch.allclose(grad, expect_grad, atol=1e-12, rtol=0), (name, op.__name__)
            checks += 1
        # shard_to_group: the input is replicated (the same on every rank).
        group = ps.get_parallel_state().group(name)
        full = data(3, 0, (2, 4 * group.world_size, 3)).requires_grad_()
        shard = comm.shard_to_group(full, group, 1)
        w = data(4, group.ranks[group.rank_in_group], shard.shape)
        (shard * w).sum().backward()
        ws = [data(4, r, shard.shape) for r in group.ranks]
        assert torch.equal(shard, full.detach().chunk(group.world_size, 1)[group.rank_in_group])
        assert torch.allclose(full.grad, torch.cat(ws, 1)), name
        checks += 1
    return checks


@pytest.mark.parametrize(
    ("size", "layout"),
    [
        (2, ParallelConfig(tp=2)),
        (4, ParallelConfig(tp=2, sp=2)),
        (4, ParallelConfig(ulysses=2, ring=2)),
    ],
    ids=["tp2", "tp2xsp2", "ulysses2xring2"],
)
def test_autograd_ops_match_the_emulated_group(worlds, size: int, layout: ParallelConfig) -> None:
    assert all(c == 5 * len(GROUPS) for c in worlds(size).run(check_autograd_ops, layout=layout))


def ulysses_round_trip(seq_len: int) -> bool:
    """Uneven sequence: shard with padding, Ulysses there and back, gather, trim: exact."""
    group = ps.get_sp_group()
    n, me = group.world_size, group.rank_in_group
    x = data(5, 0, (2, seq_len, 4 * n, 3)).requires_grad_()
    local = comm.shard_sequence(x, group, dim=1)
    assert local.shape[1] == -(-seq_len // n)
    heads = comm.all_to_all(local, group, scatter_dim=2, gather_dim=1)  # seq -> heads
    padded, _ = pad_to_multiple(x.detach(), n, 1)
    assert torch.equal(heads, padded.chunk(n, 2)[me])
    back = comm.all_to_all(heads * 2.0, group, scatter_dim=1, gather_dim=2)  # and back
    full = comm.gather_sequence(back, group, seq_len, dim=1)
    assert torch.equal(full, 2.0 * x.detach())
    full.sum().backward()
    # Every rank computes the same replicated loss, so each gets the full gradient 2.
    assert torch.equal(x.grad, torch.full_like(x, 2.0))
    return True


@pytest.mark.parametrize("seq_len", [8, 7, 5, 1])
def test_uneven_sequences_round_trip_exactly(worlds, seq_len: int) -> None:
    assert all(worlds(4).run(ulysses_round_trip, seq_len, layout=ParallelConfig(sp=4)))


def in_place_reduce_matches_the_copying_one() -> bool:
    tp = ps.get_tp_group()
    w = data(6, 0, (4, 3)).requires_grad_()
    x = data(7, tp.rank_in_group, (2, 4))
    fresh = x @ w
    copied = comm.reduce_from_group(fresh, tp)
    assert not torch.equal(copied, fresh)  # the copying op left its input alone
    in_place = comm.reduce_from_group(x @ w, tp, in_place=True)
    assert torch.equal(in_place, copied)
    in_place.sum().backward()
    assert torch.equal(w.grad, x.t() @ torch.ones(2, 3, dtype=torch.float64))
    return True


def test_in_place_reduce_matches_the_copying_one(worlds) -> None:
    assert all(worlds(2).run(in_place_reduce_matches_the_copying_one, layout=ParallelConfig(tp=2)))
