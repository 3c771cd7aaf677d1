"""A group's tensor collectives as ``torch.library`` custom ops, which ``torch.compile`` traces.

While dynamo traces, :class:`~vidpar.distributed.group.GroupCoordinator` calls these ops
instead of running its collectives: each becomes one node of the compiled graph (no graph
break), with a fake kernel that gives its output's shape. When the graph runs, the node's
kernel looks the group up by its :attr:`~GroupCoordinator.key` and runs the group's own
eager collective: the same communicator (torch's NCCL or pynccl, as chosen per op) and the
same telemetry record (bytes, count and time; CUDA times from events, as in eager mode).

The ops are functional: they return a new tensor and never write into their input (an
eager ``all_reduce`` is in place; its op copies first). Each op's output is contiguous.

Ops that attend over a group (the ring's, the replicated text queries') get their fake
kernels and autograd from :func:`register_group_attention`.
"""

from __future__ import annotations

import itertools
import weakref
from typing import Protocol

import torch
from torch.distributed import ReduceOp

__all__ = ["group_key", "lookup", "register_group_attention"]


class _Group(Protocol):
    """What the ops need of a group (:class:`~vidpar.distributed.group.GroupCoordinator`)."""

    world_size: int

    def all_reduce(self, tensor: torch.Tensor, op: ReduceOp.RedOpType) -> torch.Tensor: ...
    def all_gather(self, tensor: torch.Tensor, dim: int) -> torch.Tensor: ...
    def reduce_scatter(
        self, tensor: torch.Tensor, dim: int, op: ReduceOp.RedOpType
    ) -> torch.Tensor: ...
    def all_to_all(
        self, tensor: torch.Tensor, scatter_dim: int, gather_dim: int
    ) -> torch.Tensor: ...


_GROUPS: weakref.WeakValueDictionary[str, _Group] = weakref.WeakValueDictionary()
_NUMBERS = itertools.count()


def group_key(group: _Group, name: str) -> str:
    """Register ``group`` and return the key the ops name it by (unique in this process:
    several layouts may each have a group called ``name``)."""
    key = f"{name}#{next(_NUMBERS)}"
    _GROUPS[key] = group
    return key


def lookup(key: str) -> _Group:
    """The live group registered under ``key``."""
    group = _GROUPS.get(key)
    if group is None:
        raise RuntimeError(f"process group {key!r} no longer exists (destroyed with its layout)")
    return group


def _reduce_op(name: str) -> ReduceOp.RedOpType:
    return getattr(ReduceOp, name.upper())


def _resized(x: torch.Tensor, dim: int, factor: float) -> torch.Tensor:
    shape = list(x.shape)
    shape[dim] = int(shape[dim] * factor)
    return x.new_empty(shape)


@torch.library.custom_op("vidpar::all_reduce", mutates_args=())
def all_reduce(x: torch.Tensor, group: str, op: str) -> torch.Tensor:
    """The sum (or ``op``: ``"max"``, ``"min"``, …) of ``x`` over ``group``."""
    return lookup(group).all_reduce(x.contiguous().clone(), _reduce_op(op))


@all_reduce.register_fake
def _(x: torch.Tensor, group: str, op: str) -> torch.Tensor:
    return x.new_empty(x.shape)


@torch.library.custom_op("vidpar::all_gather", mutates_args=())
def all_gather(x: torch.Tensor, group: str, dim: int) -> torch.Tensor:
    """Every rank's ``x`` concatenated along ``dim``."""
    return lookup(group).all_gather(x, dim).contiguous()


@all_gather.register_fake
def _(x: torch.Tensor, group: str, dim: int) -> torch.Tensor:
    return _resized(x, dim, lookup(group).world_size)


@torch.library.custom_op("vidpar::reduce_scatter", mutates_args=())
def reduce_scatter(x: torch.Tensor, group: str, dim: int, op: str) -> torch.Tensor:
    """This rank's chunk along ``dim`` of the sum (or ``op``) over ``group``."""
    return lookup(group).reduce_scatter(x, dim, _reduce_op(op)).contiguous()


@reduce_scatter.register_fake
def _(x: torch.Tensor, group: str, dim: int, op: str) -> torch.Tensor:
    return _resized(x, dim, 1 / lookup(group).world_size)


@torch.library.custom_op("vidpar::all_to_all", mutates_args=())
def all_to_all(x: torch.Tensor, group: str, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """Chunk ``i`` along ``scatter_dim`` to rank ``i``; what arrives concatenated along
    ``gather_dim``."""
    return lookup(group).all_to_all(x, scatter_dim, gather_dim).contiguous()


@all_to_all.register_fake
def _(x: torch.Tensor, group: str, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    n = lookup(group).world_size
    shape = list(x.shape)
    shape[scatter_dim] //= n
    shape[gather_dim] *= n
    return x.new_empty(shape)


def register_group_attention(forward, backward) -> None:
    """The fake kernels and autograd of a pair of ``torch.library`` custom ops that attend
    over a process group: ``forward(q, k, v, extra_k, extra_v, extra_bias, group, plan,
    scale) -> (out [B, L, H, D], lse [B, H, L])`` (lse float32, float64 for float64) and
    ``backward(dout, q, k, v, extra_k, extra_v, extra_bias, out, lse, group, plan, scale)
    -> [dq, dk, dv(, d extra_k, d extra_v)]`` (``extra_*``: optional joint keys and their
    score bias; ``plan``: the op's own non-tensor argument)."""

    @forward.register_fake
    def _(q, *_):
        batch, length, heads, _ = q.shape
        lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        return q.new_empty(q.shape), q.new_empty((batch, heads, length), dtype=lse_dtype)

    @backward.register_fake
    def _(dout, q, k, v, extra_k, extra_v, *_):
        inputs = (q, k, v) if extra_k is None else (q, k, v, extra_k, extra_v)
        return [t.new_empty(t.shape) for t in inputs]

    def save(ctx, inputs, output) -> None:
        *tensors, group, plan, scale = inputs
        ctx.save_for_backward(*tensors, *output)
        ctx.arguments = (group, plan, scale)

    def grads(ctx, dout, _dlse):
        dq, dk, dv, *extra = backward(dout, *ctx.saved_tensors, *ctx.arguments)
        dextra_k, dextra_v = extra if extra else (None, None)
        return dq, dk, dv, dextra_k, dextra_v, None, None, None, None

    forward.register_autograd(grads, setup_context=save)
