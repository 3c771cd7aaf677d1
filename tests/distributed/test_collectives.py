"""Every GroupCoordinator operation, on every group of real gloo worlds, against the
single-process computation of the same result."""

from __future__ import annotations

import pytest
import torch

from vidpar.config import GROUP_DIMS, ParallelConfig
from vidpar.distributed import state as ps

LAYOUTS = [
    pytest.param(2, ParallelConfig(tp=2), id="tp2"),
    pytest.param(2, ParallelConfig(ring=2), id="ring2"),
    pytest.param(4, ParallelConfig(tp=2, sp=2), id="tp2xsp2"),
    pytest.param(4, ParallelConfig(ulysses=2, ring=2), id="ulysses2xring2"),
    pytest.param(4, ParallelConfig(cfg=2, dp=2), id="cfg2xdp2"),
    pytest.param(8, ParallelConfig(tp=2, sp=2, dp=2), id="tp2xsp2xdp2"),
]


def member_data(rank: int, shape: tuple[int, ...], dtype=torch.float64) -> torch.Tensor:
    """Rank ``rank``'s deterministic input, reproducible by every other rank."""
    gen = torch.Generator().manual_seed(1000 + rank)
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)


def check_every_op_on_every_group() -> list[str]:
    """Runs on each rank; returns the names of the checks that ran (all must pass)."""
    done = []
    for name in GROUP_DIMS:
        group = ps.get_parallel_state().group(name)
        n, me = group.world_size, group.rank_in_group
        shape = (2 * n, 3 * n, 4)
        xs = [member_data(r, shape).to(group.device) for r in group.ranks]
        x = xs[me]

        assert torch.allclose(group.all_reduce(x.clone()), sum(xs)), name
        for dim in (0, 1, -1):
            assert torch.equal(group.all_gather(x, dim), torch.cat(xs, dim)), (name, dim)
        dst = n - 1
        gathered = group.gather(x, dst=dst, dim=1)
        if me == dst or n == 1:
            assert torch.equal(gathered, torch.cat(xs, 1)), name
        else:
            assert gathered is None
        for dim in (0, 1):
            expect = sum(xs).chunk(n, dim)[me]
            assert torch.allclose(group.reduce_scatter(x.clone(), dim), expect), (name, dim)
        for scatter, gather in ((1, 0), (0, 1), (2, 1)) if n <= 4 else ((1, 0), (0, 1)):
            expect = torch.cat([xj.chunk(n, scatter)[me] for xj in xs], gather)
            assert torch.equal(group.all_to_all(x, scatter, gather), expect), (name, scatter)
        src = n - 1
        assert torch.equal(group.broadcast(x.clone(), src=src), xs[src]), name
        obj = group.broadcast_object({"from": group.ranks[me]}, src=src)
        assert obj == {"from": group.ranks[src]}
        tensors = group.broadcast_tensor_dict({"x": x, "step": 7, "y": x[:1].float()}, src=src)
        assert torch.equal(tensors["x"], xs[src]) and tensors["step"] == 7
        assert tensors["y"].dtype == torch.float32
        if n > 1:
            # Around the ring: even members send first so blocking gloo pairs never deadlock.
            if me % 2 == 0:
                group.send(x)
                got = group.recv(x.shape, x.dtype)
                group.send_object(("hello", me))
                msg = group.recv_object()
            else:
                got = group.recv(x.shape, x.dtype)
                group.send(x)
                msg = group.recv_object()
                group.send_object(("hello", me))
            assert torch.equal(got, xs[group.prev_rank]), name
            assert msg == ("hello", group.prev_rank)
        group.barrier()
        done.append(name)
    return done


@pytest.mark.parametrize(("size", "layout"), LAYOUTS)
def test_every_op_matches_single_process_math(worlds, size: int, layout: ParallelConfig) -> None:
    results = worlds(size).run(check_every_op_on_every_group, layout=layout)
    assert all(r == list(GROUP_DIMS) for r in results)


def groups_seen_by_this_rank() -> dict[str, list[int]]:
    return {name: ps.get_parallel_state().group(name).ranks for name in GROUP_DIMS}


@pytest.mark.parametrize(("size", "layout"), LAYOUTS)
def test_groups_match_the_pure_layout(worlds, size: int, layout: ParallelConfig) -> None:
    config = layout.resolve(size)
    for rank, groups in enumerate(worlds(size).run(groups_seen_by_this_rank, layout=layout)):
        for name, ranks in groups.items():
            assert ranks == config.group_of(name, rank), (rank, name)


def mesh_groups() -> tuple[dict[str, list[int]], list[str]]:
    state = ps.get_parallel_state()
    mesh = state.mesh
    ranks = {dim: mesh[dim].mesh.flatten().tolist() for dim in mesh.mesh_dim_names}
    # The mesh holds the layout's own process groups: none was created a second time.
    same = [dim for dim in mesh.mesh_dim_names if mesh.get_group(dim) is state._mesh_groups[dim]]
    shared = [
        d for d in ("tp", "ulysses", "dp") if mesh.get_group(d) is state.group(d).device_group
    ]
    return ranks, same + shared


def test_device_mesh_is_made_of_the_layouts_own_groups(worlds) -> None:
    layout = ParallelConfig(tp=2, sp=2, dp=2)
    config = layout.resolve(8)
    for rank, (groups, same) in enumerate(worlds(8).run(mesh_groups, layout=layout)):
        assert list(groups) == ["dp", "cfg", "ring", "ulysses", "tp"]
        assert same == ["dp", "cfg", "ring", "ulysses", "tp", "tp", "ulysses", "dp"]
        for dim, ranks in groups.items():
            assert ranks == config.group_of(dim, rank), (rank, dim)


def size_one_groups_do_nothing() -> bool:
    cfg = ps.get_cfg_group()
    x = torch.randn(3)
    assert cfg.world_size == 1 and cfg.communicator is None
    assert cfg.all_reduce(x) is x and cfg.all_gather(x) is x and cfg.broadcast(x) is x
    assert cfg.broadcast_object("o") == "o"
    return True


def test_groups_of_one_communicate_nothing(worlds) -> None:
    assert all(worlds(2).run(size_one_groups_do_nothing, layout=ParallelConfig(tp=2)))


def getter_after_destroy() -> tuple[int, list[int], int]:
    ps.initialize_model_parallel(ParallelConfig(tp=2))
    ps.destroy_model_parallel()
    tp = ps.get_tp_group()  # no layout any more: a world of one
    return tp.world_size, tp.ranks, ps.get_parallel_config().world_size


def test_after_destroy_the_state_is_a_world_of_one(worlds) -> None:
    assert worlds(2).run(getter_after_destroy) == [(1, [0], 1), (1, [1], 1)]


def test_without_a_layout_every_group_is_a_world_of_one() -> None:
    state = ps.get_parallel_state()
    assert state is ps.ParallelState.single() and state.is_single
    assert {name: g.ranks for name, g in state.groups.items()} == {n: [0] for n in GROUP_DIMS}
    x = torch.randn(3)
    assert ps.get_sp_group().all_reduce(x) is x and ps.get_world_group().world_size == 1
    with pytest.raises(RuntimeError, match="needs initialize_model_parallel"):
        _ = state.mesh
    with pytest.raises(ValueError, match="unknown group 'pp'"):
        state.group("pp")


def wrong_world_size() -> str:
    try:
        ps.initialize_model_parallel(ParallelConfig(tp=2, sp=2, dp=1))
    except ValueError as err:
        return str(err)
    return "no error"


def test_layout_larger_than_the_world_fails_before_any_group(worlds) -> None:
    for message in worlds(2).run(wrong_world_size):
        assert message == "tp(2) × sp(2) × cfg(1) × dp(1) = 4, but world size is 2"
