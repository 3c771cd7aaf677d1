"""The rank layout, checked as pure functions over every factorisation up to world 64."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vidpar.config import DIMS, GROUP_DIMS, ParallelConfig


@st.composite
def layouts(draw) -> ParallelConfig:
    """A random factorisation of a random world size of at most 64 into the five dims."""
    world = draw(st.integers(1, 64))
    remaining, sizes = world, {}
    for dim in ("tp", "ulysses", "ring", "cfg"):
        divisors = [d for d in range(1, remaining + 1) if remaining % d == 0]
        sizes[dim] = draw(st.sampled_from(divisors))
        remaining //= sizes[dim]
    return ParallelConfig(**sizes, dp=-1, world_size=world)


@settings(max_examples=300, deadline=None)
@given(layouts())
def test_every_group_partitions_the_world(config: ParallelConfig) -> None:
    world = set(range(config.world_size))
    for name in GROUP_DIMS:
        groups = config.group_ranks(name)
        members = [r for g in groups for r in g]
        assert sorted(members) == sorted(world), name
        assert all(len(g) == config.size(name) for g in groups), name
        assert len(groups) == config.world_size // config.size(name)


@settings(max_examples=300, deadline=None)
@given(layouts())
def test_groups_of_different_dims_meet_in_exactly_one_rank(config: ParallelConfig) -> None:
    single = ["tp", "ulysses", "ring", "cfg", "dp"]
    for rank in range(config.world_size):
        own = {name: set(config.group_of(name, rank)) for name in [*single, "sp"]}
        for i, a in enumerate(single):
            for b in single[i + 1 :]:
                assert own[a] & own[b] == {rank}, (a, b, rank)
        for other in ("tp", "cfg", "dp"):
            assert own["sp"] & own[other] == {rank}


@settings(max_examples=300, deadline=None)
@given(layouts())
def test_coordinates_round_trip_and_tp_is_fastest(config: ParallelConfig) -> None:
    for rank in range(config.world_size):
        coords = config.coordinates(rank)
        assert config.rank(coords) == rank
        assert set(coords) == set(DIMS)
    for group in config.group_ranks("tp"):
        assert group == list(range(group[0], group[0] + config.tp))
    # Inside an sp group, rank order is ring-major: shard s is ring block s // ulysses.
    for group in config.group_ranks("sp"):
        coords = [config.coordinates(r) for r in group]
        order = [c["ring"] * config.ulysses + c["ulysses"] for c in coords]
        assert order == list(range(config.sp))


def test_sp_groups_of_an_eight_rank_world() -> None:
    config = ParallelConfig(tp=2, sp=2, dp=2)
    assert config.world_size == 8
    assert config.group_ranks("sp") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert config.group_ranks("tp") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert config.group_ranks("dp") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert config.group_ranks("dp_sp") == [[0, 2, 4, 6], [1, 3, 5, 7]]


def test_usp_layout_orders_ring_outside_ulysses() -> None:
    config = ParallelConfig(ulysses=2, ring=2)
    assert (config.sp, config.world_size) == (4, 4)
    assert config.group_ranks("ulysses") == [[0, 1], [2, 3]]
    assert config.group_ranks("ring") == [[0, 2], [1, 3]]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            dict(tp=2, sp=2, dp=1, world_size=3),
            "tp(2) × sp(2) × cfg(1) × dp(1) = 4, but world size is 3",
        ),
        (dict(tp=2, sp=2, world_size=6), "= 4 does not divide world size 6"),
        (dict(sp=4, ulysses=3), "sp(4) must equal ulysses × ring"),
        (dict(tp=0), "tp must be a positive integer, got 0"),
        (dict(dp=-2), "dp must be a positive integer, got -2"),
    ],
)
def test_bad_sizes_name_the_numbers(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ParallelConfig(**kwargs)


def test_dp_is_inferred_from_the_world_size() -> None:
    config = ParallelConfig(tp=2, sp=2).resolve(16)
    assert (config.dp, config.world_size) == (4, 16)
    with pytest.raises(ValueError, match="but world size is 8"):
        ParallelConfig(tp=2, dp=1).resolve(8)


def test_every_rank_of_ulysses_and_tp_needs_a_head() -> None:
    ParallelConfig(tp=2, ulysses=2, ring=2).check_heads(12)
    ParallelConfig(tp=2, sp=2).check_heads(6)  # uneven: 2 + 1 heads per tp rank
    with pytest.raises(
        ValueError, match=r"num_heads\(3\) is fewer than ulysses\(2\) × tp\(2\) = 4"
    ):
        ParallelConfig(tp=2, sp=2).check_heads(3)


def test_describe_and_sizes() -> None:
    config = ParallelConfig(tp=2, ulysses=2, ring=2, cfg=2)
    assert config.describe() == "dp1 × cfg2 × ring2 × ulysses2 × tp2 = 16"
    assert math.prod(config.sizes.values()) == config.world_size
