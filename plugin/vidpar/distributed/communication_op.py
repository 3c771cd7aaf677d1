"""Collectives that autograd can differentiate through.

Each op pairs a forward collective with the collective its gradient needs:

============================  =========================  ===========================
op                            forward                    backward
============================  =========================  ===========================
:func:`copy_to_group`         identity                   all-reduce
:func:`reduce_from_group`     all-reduce                 identity
:func:`shard_to_group`        keep this rank's shard     all-gather
:func:`gather_from_group`     all-gather                 keep this rank's shard
:func:`all_to_all`            all-to-all                 the inverse all-to-all
============================  =========================  ===========================

:func:`shard_sequence` and :func:`gather_sequence` handle sequence lengths that do not
divide the group size: the sequence is zero-padded at its end before sharding and the
padding is trimmed after gathering, so the round trip is exact.

Under ``torch.compile`` these functions are traced whole, forward and backward: their
collectives become the custom ops of :mod:`vidpar.distributed.collective_ops`, so a block
with tp or Ulysses compiles to one graph; with a group of one there is no op at all.
"""

from __future__ import annotations

import torch

from vidpar.distributed.group import GroupCoordinator
from vidpar.distributed.utils import pad_to_multiple, split_tensor_along_dim, unpad


class _CopyToGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: GroupCoordinator) -> torch.Tensor:
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _summed(grad, ctx.group), None


def _summed(x: torch.Tensor, group: GroupCoordinator) -> torch.Tensor:
    """The sum of ``x`` over ``group`` in a new tensor (traced, the all-reduce is out of
    place already)."""
    return group.all_reduce(x if torch.compiler.is_compiling() else x.contiguous().clone())


class _ReduceFromGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: GroupCoordinator, in_place: bool) -> torch.Tensor:
        if not in_place or torch.compiler.is_compiling() or not x.is_contiguous():
            return _summed(x, group)
        ctx.mark_dirty(x)
        return group.all_reduce(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None, None


class _ShardToGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: GroupCoordinator, dim: int) -> torch.Tensor:
        ctx.group, ctx.dim = group, dim
        return split_tensor_along_dim(x, group.world_size, dim)[group.rank_in_group].contiguous()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return ctx.group.all_gather(grad.contiguous(), ctx.dim), None, None


class _GatherFromGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: GroupCoordinator, dim: int) -> torch.Tensor:
        ctx.group, ctx.dim = group, dim
        return group.all_gather(x.contiguous(), dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        group = ctx.group
        return (
            split_tensor_along_dim(grad, group.world_size, ctx.dim)[group.rank_in_group],
            None,
            None,
        )


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, x: torch.Tensor, group: GroupCoordinator, scatter_dim: int, gather_dim: int
    ) -> torch.Tensor:
        ctx.group, ctx.scatter_dim, ctx.gather_dim = group, scatter_dim, gather_dim
        return group.all_to_all(x, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return ctx.group.all_to_all(grad, ctx.gather_dim, ctx.scatter_dim), None, None, None


def copy_to_group(x: torch.Tensor, group: GroupCoordinator) -> torch.Tensor:
    """Identity forward; the gradient is summed over ``group`` (input of a column-parallel
    layer, whose partial input gradients each rank computes)."""
    return x if group.world_size == 1 else _CopyToGroup.apply(x, group)


def reduce_from_group(
    x: torch.Tensor, group: GroupCoordinator, *, in_place: bool = False
) -> torch.Tensor:
    """Sum over ``group`` forward; identity backward (output of a row-parallel layer).

    ``in_place=True`` reduces ``x`` itself instead of a copy: for a fresh intermediate
    that nothing else reads, such as a matmul's output (autograd rejects it if a backward
    still needs ``x``)."""
    return x if group.world_size == 1 else _ReduceFromGroup.apply(x, group, in_place)


def shard_to_group(x: torch.Tensor, group: GroupCoordinator, dim: int) -> torch.Tensor:
    """This rank's equal shard along ``dim``; backward gathers the gradient."""
    return x if group.world_size == 1 else _ShardToGroup.apply(x, group, dim)


def gather_from_group(x: torch.Tensor, group: GroupCoordinator, dim: int) -> torch.Tensor:
    """Every rank's shard concatenated along ``dim``; backward keeps this rank's shard of
    the gradient (the computation after the gather is replicated on every rank)."""
    return x if group.world_size == 1 else _GatherFromGroup.apply(x, group, dim)


def all_to_all(
    x: torch.Tensor, group: GroupCoordinator, scatter_dim: int, gather_dim: int
) -> torch.Tensor:
    """Differentiable all-to-all: scatter ``scatter_dim``, gather ``gather_dim``."""
    return x if group.world_size == 1 else _AllToAll.apply(x, group, scatter_dim, gather_dim)


def shard_sequence(x: torch.Tensor, group: GroupCoordinator, dim: int = 1) -> torch.Tensor:
    """This rank's shard of a sequence of any length, zero-padded at the end to a multiple
    of the group size. Keep ``x.shape[dim]`` to trim with :func:`gather_sequence`."""
    padded, _ = pad_to_multiple(x, group.world_size, dim)
    return shard_to_group(padded, group, dim)


def gather_sequence(
    x: torch.Tensor, group: GroupCoordinator, length: int, dim: int = 1
) -> torch.Tensor:
    """The full sequence of ``length`` items from the shards of :func:`shard_sequence`."""
    return unpad(gather_from_group(x, group, dim), length, dim)
