"""Ring attention: this rank's queries over every ring rank's K/V block, exactly.

Queries stay put while K/V blocks travel around the ring group, each exchange overlapped
with the previous block's compute; block results come from fused kernels that return the
log-sum-exp (:mod:`vidpar.nn.attention_kernels`) and are merged by it
(:mod:`vidpar.nn.softmax_merge`: float32 arithmetic, stored in place in the activation
dtype). Its backward passes K/V and the float32 dK/dV accumulators around the ring the same
way. Over a real group the whole ring, forward and backward, is one ``torch.library`` custom
op, which ``torch.compile`` traces as one node; :class:`~vidpar.nn.testing.LocalRing` runs
rank 0's work on one device, for benchmarks and tests.
"""

from __future__ import annotations

import enum
from typing import Protocol

import torch
import torch.distributed as dist

from vidpar.distributed import collective_ops, telemetry
from vidpar.distributed.group import GroupCoordinator
from vidpar.nn.attention_kernels import (
    attention_backward,
    attention_forward,
    heads_first,
)
from vidpar.nn.softmax_merge import SoftmaxMerge

__all__ = ["RingMessage", "RingPeers", "ring_attention"]


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group: GroupCoordinator | RingPeers,
    valid: list[int],
    joint_k: torch.Tensor | None = None,
    joint_v: torch.Tensor | None = None,
    scale: float | None = None,
    joint_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of this ring rank's query block over every rank's K/V block.

    ``q, k, v``: ``[B, S_block, H, D]``, rank ``i`` of ``group`` holding block ``i``;
    ``valid[j]``: the number of real (unpadded) tokens at the start of block ``j``.
    ``joint_k/joint_v``: ``[B, L, H, D]`` local extra keys attended by every query;
    ``joint_bias``: their score bias ``[B, 1, 1, L]``
    (:func:`~vidpar.nn.attention_kernels.key_bias` of a mask of the keys that count).
    ``group`` may be other :class:`RingPeers` (such as :class:`vidpar.nn.testing.LocalRing`:
    rank 0's work with the blocks on one device), run as a plain autograd function.
    Each block runs on a fused kernel of :mod:`vidpar.nn.attention_kernels`. With a real
    group the whole ring (its exchanges overlapped with the blocks' kernels) is one custom
    op, forward and backward, so ``torch.compile`` traces it as one node of the graph.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if not isinstance(group, GroupCoordinator):
        return _RingAttention.apply(
            q, k, v, joint_k, joint_v, joint_bias, group, tuple(valid), scale
        )
    out, _ = torch.ops.vidpar.ring_attention(
        q, k, v, joint_k, joint_v, joint_bias, group.key, valid, scale
    )
    return out


def _stack_kv(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``[2, B, S, H, D]``: K and V as one tensor to send, a view when V follows K in
    memory (as after the Ulysses all-to-all), else a copy."""
    if (
        k.is_contiguous()
        and v.is_contiguous()
        and k.shape == v.shape
        and k.dtype == v.dtype
        and k.untyped_storage().data_ptr() == v.untyped_storage().data_ptr()
        and v.data_ptr() == k.data_ptr() + k.numel() * k.element_size()
    ):
        return k.as_strided((2, *k.shape), (k.numel(), *k.stride()))
    return torch.stack((k, v))


class RingMessage(enum.Enum):
    """What travels around the ring: K/V blocks, or the dK/dV accumulators of a backward."""

    KV = "kv"
    GRADS = "grads"


#: The NCCL/gloo tag each message kind travels under (so the two exchanges in flight
#: together during a backward never match each other's receives).
_P2P_TAGS = {RingMessage.KV: 0, RingMessage.GRADS: 1}


class RingPending(Protocol):
    def wait(self) -> torch.Tensor:
        """The tensor received from the previous rank."""
        ...


class RingPeers(Protocol):
    """A ring as the ring attention sees it: this member's ``rank`` of ``size``, and an
    exchange that sends ``tensor`` to the next member while one comes from the previous."""

    rank: int
    size: int

    def start(self, tensor: torch.Tensor, message: RingMessage) -> RingPending: ...


class _RingExchange:
    """Send a tensor to the next rank of a ring group and receive one of the same shape
    from the previous rank, asynchronously (one batched isend/irecv pair)."""

    def __init__(self, group: GroupCoordinator) -> None:
        self.group = group
        self.rank, self.size = group.rank_in_group, group.world_size
        self.next = group.ranks[group.next_rank]
        self.prev = group.ranks[group.prev_rank]

    def start(self, tensor: torch.Tensor, message: RingMessage) -> _Pending | _Ready:
        if self.size == 1:  # a ring of one (no layout): the tensor comes back to this rank
            return _Ready(tensor)
        tensor = tensor.contiguous()
        received = torch.empty_like(tensor)
        pg, tag = self.group.device_group, _P2P_TAGS[message]
        ops = [
            dist.P2POp(dist.isend, tensor, self.next, pg, tag),
            dist.P2POp(dist.irecv, received, self.prev, pg, tag),
        ]
        return _Pending(self.group, tensor, received, dist.batch_isend_irecv(ops))


class _Pending:
    def __init__(self, group: GroupCoordinator, sent: torch.Tensor, received, works) -> None:
        self.group, self.sent, self.received, self.works = group, sent, received, works

    def wait(self) -> torch.Tensor:
        """The received tensor. Telemetry records the time spent waiting here (the
        communication not hidden behind compute) as ``send_recv``."""
        with telemetry.measure("send_recv", self.group.name, self.sent, self.group.world_size):
            for work in self.works:
                work.wait()
        return self.received


class _Ready:
    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor

    def wait(self) -> torch.Tensor:
        return self.tensor


class _RingAttention(torch.autograd.Function):
    """The ring over other :class:`RingPeers` than a group (no custom op), such as the
    single-device :class:`vidpar.nn.testing.LocalRing` of benchmarks and tests."""

    @staticmethod
    def forward(ctx, q, k, v, joint_k, joint_v, joint_bias, ring, valid, scale):
        out, lse = _ring_forward(q, k, v, joint_k, joint_v, joint_bias, ring, valid, scale)
        ctx.save_for_backward(q, k, v, joint_k, joint_v, joint_bias, out, lse)
        ctx.ring, ctx.valid, ctx.scale = ring, valid, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        grads = _ring_backward(dout, *ctx.saved_tensors, ctx.ring, ctx.valid, ctx.scale)
        return *grads, None, None, None, None


@torch.library.custom_op("vidpar::ring_attention", mutates_args=())
def _ring_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    joint_k: torch.Tensor | None,
    joint_v: torch.Tensor | None,
    joint_bias: torch.Tensor | None,
    group: str,
    valid: list[int],
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ring attention over the ring group ``group`` (a group's key): output and lse."""
    ring = _RingExchange(collective_ops.lookup(group))
    out, lse = _ring_forward(q, k, v, joint_k, joint_v, joint_bias, ring, tuple(valid), scale)
    return out, lse.contiguous()  # the kernels' lse may be a transposed view


@torch.library.custom_op("vidpar::ring_attention_backward", mutates_args=())
def _ring_attention_backward_op(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    joint_k: torch.Tensor | None,
    joint_v: torch.Tensor | None,
    joint_bias: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    group: str,
    valid: list[int],
    scale: float,
) -> list[torch.Tensor]:
    """dq, dk, dv (and djoint_k, djoint_v when joint tokens were given) of the ring."""
    ring = _RingExchange(collective_ops.lookup(group))
    grads = _ring_backward(
        dout, q, k, v, joint_k, joint_v, joint_bias, out, lse, ring, tuple(valid), scale
    )
    return _unaliased([g for g in grads if g is not None])


def _unaliased(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """``tensors`` with each one that shares storage with an earlier one copied (a custom
    op's outputs may not alias each other; dK and dV are views of one buffer when they
    need no cast)."""
    seen: set[int] = set()
    result = []
    for tensor in tensors:
        storage = tensor.untyped_storage().data_ptr()
        result.append(tensor.clone() if storage in seen else tensor)
        seen.add(storage)
    return result


collective_ops.register_group_attention(_ring_attention_op, _ring_attention_backward_op)


def _ring_forward(q, k, v, joint_k, joint_v, joint_bias, ring, valid, scale):
    """Every block's attention merged by log-sum-exp: ``(out [B, S, H, D], lse)``."""
    with torch.autocast(q.device.type, enabled=False):  # kernels in the input dtype
        rank, size = ring.rank, ring.size
        qh = heads_first(q)
        kv = _stack_kv(k, v)
        merge = SoftmaxMerge()
        for step in range(size):
            pending = ring.start(kv, RingMessage.KV) if step < size - 1 else None
            n = valid[(rank - step) % size]  # this step's block came from rank - step
            if n > 0:
                kb, vb = (heads_first(t[:, :n]) for t in kv)
                merge.add(*attention_forward(qh, kb, vb, scale))
            if pending is not None:
                kv = pending.wait()
        if joint_k is not None:
            jk, jv = heads_first(joint_k), heads_first(joint_v)
            merge.add(*attention_forward(qh, jk, jv, scale, joint_bias))
        out, lse = merge.result()
        return out.transpose(1, 2).contiguous(), lse


def _ring_backward(dout, q, k, v, joint_k, joint_v, joint_bias, out, lse, ring, valid, scale):
    """``(dq, dk, dv, djoint_k, djoint_v)``: each block's fused backward with the final
    output and log-sum-exp; dK/dV accumulators (float32, or float64) travel around the ring
    with their K/V block and come home complete."""
    with torch.autocast(dout.device.type, enabled=False):
        rank, size = ring.rank, ring.size
        dtype = lse.dtype  # float32, or float64 for float64 inputs
        qh, oh, do = heads_first(q), heads_first(out), heads_first(dout.contiguous())
        dq = None
        kv = _stack_kv(k, v)
        grads = None  # dK/dV accumulated for the block held, travelling with it
        for step in range(size):
            kv_pending = ring.start(kv, RingMessage.KV) if step < size - 1 else None
            n = valid[(rank - step) % size]
            if n > 0:
                kb, vb = (heads_first(t[:, :n]) for t in kv)
                dqb, dkb, dvb = attention_backward(do, qh, kb, vb, oh, lse, scale)
                dq = dqb.to(dtype) if dq is None else dq.add_(dqb)
            if grads is None:  # the first block: its accumulators start from this rank's share
                block_grads = kv.new_empty(kv.shape, dtype=dtype)
                block_grads[:, :, n:].zero_()
                if n > 0:
                    block_grads[0, :, :n].copy_(dkb.transpose(1, 2))
                    block_grads[1, :, :n].copy_(dvb.transpose(1, 2))
            else:
                block_grads = grads.wait()
                if n > 0:
                    block_grads[0, :, :n].add_(dkb.transpose(1, 2))
                    block_grads[1, :, :n].add_(dvb.transpose(1, 2))
            if n > 0:
                del dqb, dkb, dvb  # freed before the next block's kernel allocates its own
            grads = ring.start(block_grads, RingMessage.GRADS)
            if kv_pending is not None:
                kv = kv_pending.wait()
        dk, dv = grads.wait().to(k.dtype).unbind(0)  # this rank's own block, complete
        djk = djv = None
        if joint_k is not None:
            jk, jv = heads_first(joint_k), heads_first(joint_v)
            dqj, djk, djv = attention_backward(do, qh, jk, jv, oh, lse, scale, joint_bias)
            dq = dqj.to(dtype) if dq is None else dq.add_(dqj)
            djk, djv = djk.transpose(1, 2).to(joint_k.dtype), djv.transpose(1, 2).to(joint_v.dtype)
        return dq.transpose(1, 2).to(q.dtype), dk, dv, djk, djv
