"""DistributedAttention: exact softmax attention over a sequence sharded across the sp group.

Each rank holds ``S/sp`` tokens of the sequence (the sp shard of
:func:`~vidpar.distributed.communication_op.shard_sequence`, zero-padded at the end) and the
tp-local heads. The layout picks the mode:

* **Ulysses** (ulysses > 1): an all-to-all trades the sequence shard for a head shard, so
  every rank attends over the whole sequence with ``heads/ulysses`` heads, and back. Q, K
  and V travel packed in one buffer: one all-to-all there, one for the output back. When
  ulysses does not divide the heads, the first ranks take one head more; the other
  ranks' head slices travel padded with a zero head to the largest, which is dropped on
  arrival (exact, at the cost of sending that padding).
* **Ring** (ring > 1): queries stay put while K/V blocks travel around the ring group,
  each exchange overlapped with the previous block's compute; block results come from
  fused kernels that return the log-sum-exp (:mod:`vidpar.nn.attention_kernels`) and are
  merged by it (:mod:`vidpar.nn.softmax_merge`: float32 arithmetic, stored in place in
  the activation dtype). Its backward passes K/V and the float32 dK/dV accumulators
  around the ring the same way.
* **USP** (both): Ulysses inside, ring outside. The sp rank is ``ring × ulysses_size +
  ulysses``, so after the Ulysses exchange the ulysses group holds ring block ``ring``.

sp = 1 is plain ``scaled_dot_product_attention`` with no communication. Padded keys (past
``seq_len``) are ignored. Extra keys/values replicated on every sp rank (``joint_k``,
``joint_v``: text tokens in Wan/HunyuanVideo-style joint attention) are attended by every
query.

Gradients of tensors replicated over sp (``joint_k``/``joint_v`` and everything upstream
of them) are partial on each rank: each holds its own queries' share, and the sum over
the sp group is the full gradient, as the sequence-parallel gradient reduction of
replicated parameters expects.
"""

from __future__ import annotations

import enum
from typing import Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from vidpar.distributed import collective_ops, telemetry
from vidpar.distributed.communication_op import all_to_all
from vidpar.distributed.group import GroupCoordinator
from vidpar.distributed.state import get_parallel_state
from vidpar.distributed.utils import split_sizes
from vidpar.nn.attention_kernels import attention_backward, attention_forward, heads_first
from vidpar.nn.linear import GroupRef
from vidpar.nn.softmax_merge import SoftmaxMerge

__all__ = ["DistributedAttention", "RingMessage", "RingPeers", "ring_attention"]


class DistributedAttention(nn.Module):
    """Softmax attention ``softmax(q kᵀ · scale) v`` over the full sequence while each rank
    holds its sp shard of it.

    The groups default to the current layout's (groups of one without a layout); the
    model that holds the layer checks its heads against the layout
    (:meth:`~vidpar.distributed.ParallelState.check_heads`). The layer has no parameters;
    put it inside your own attention block between the projections.
    """

    def __init__(
        self,
        num_heads: int | None = None,
        *,
        scale: float | None = None,
        ulysses_group: GroupCoordinator | None = None,
        ring_group: GroupCoordinator | None = None,
    ) -> None:
        super().__init__()
        state = get_parallel_state()
        self._ulysses = GroupRef(ulysses_group or state.group("ulysses"))
        self._ring = GroupRef(ring_group or state.group("ring"))
        self.scale = scale
        self.num_heads = num_heads

    @property
    def ulysses_group(self) -> GroupCoordinator:
        return self._ulysses.group

    @property
    def ring_group(self) -> GroupCoordinator:
        return self._ring.group

    def extra_repr(self) -> str:
        return (
            f"num_heads={self.num_heads}, ulysses={self.ulysses_group.world_size}, "
            f"ring={self.ring_group.world_size}"
        )

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        seq_len: int | None = None,
        joint_k: torch.Tensor | None = None,
        joint_v: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention for this rank's queries; returns ``[B, S_local, H, D]``.

        Args:
            q, k, v: ``[B, S_local, H, D]``: this rank's sp shard of the (end-padded)
                sequence, with the tp-local heads.
            seq_len: true length of the full sequence; keys past it are padding and are
                ignored. Default: no padding (``S_local × sp``).
            joint_k, joint_v: ``[B, L, H, D]`` extra keys and values, the same on every sp
                rank (tp-local heads), attended by every query.
        """
        uly, ring = self.ulysses_group, self.ring_group
        u, r = uly.world_size, ring.world_size
        _, local_len, heads, head_dim = q.shape
        total = local_len * u * r
        seq_len = total if seq_len is None else seq_len
        if not 0 <= seq_len <= total or (seq_len == 0 and joint_k is None):
            raise ValueError(
                f"seq_len({seq_len}) must be in 1..{total} (S_local({local_len}) × sp({u * r}))"
            )
        if (joint_k is None) != (joint_v is None):
            raise ValueError("pass both joint_k and joint_v, or neither")
        if k.shape != q.shape or v.shape != q.shape:
            raise ValueError(
                f"q, k and v must have one shape, got {tuple(q.shape)}, {tuple(k.shape)} and "
                f"{tuple(v.shape)} (grouped-query K/V: repeat their heads to q's first)"
            )
        if heads < u:
            raise ValueError(
                f"the layer got {heads} heads per tp rank, fewer than ulysses({u}): every "
                "rank needs a head"
            )
        scale = head_dim**-0.5 if self.scale is None else self.scale

        if u > 1:
            sizes = split_sizes(heads, u)  # every ulysses rank's heads
            q, k, v = _heads_to_ranks(q, k, v, uly, sizes)
            if joint_k is not None:
                start, h = sum(sizes[: uly.rank_in_group]), sizes[uly.rank_in_group]
                joint_k, joint_v = joint_k.narrow(2, start, h), joint_v.narrow(2, start, h)
        block = q.shape[1]  # this ring rank's block of the sequence after Ulysses
        valid = [max(0, min(block, seq_len - j * block)) for j in range(r)]
        if r == 1:
            out = _local_attention(q, k, v, valid[0], joint_k, joint_v, scale)
        else:
            out = ring_attention(q, k, v, ring, valid, joint_k, joint_v, scale)
        if u > 1:
            out = _heads_back(out, uly, sizes)
        return out


def _heads_to_ranks(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group: GroupCoordinator,
    sizes: tuple[int, ...],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Ulysses exchange of q, k and v in one all-to-all: ``[B, S/P, H, D]`` each, this
    rank's sequence shard, to ``[B, S, sizes[rank], D]`` each, this rank's heads (K and V
    adjacent in memory, as the ring sends them).

    Uneven heads: the send buffer ``[P, 3, B, S/P, h, D]`` is filled destination-major,
    each destination's heads padded with zeros to the largest ``h``, and the padding is
    dropped on arrival."""
    largest = max(sizes)
    if min(sizes) == largest:  # [3, B, S/P, H, D] -> [3, B, S, H/P, D]
        return all_to_all(torch.stack((q, k, v)), group, 3, 2).unbind(0)
    n, mine = group.world_size, sizes[group.rank_in_group]
    batch, local_len, _, head_dim = q.shape
    send = q.new_zeros(n, 3, batch, local_len, largest, head_dim)
    start = 0
    for dst, h in enumerate(sizes):
        for j, t in enumerate((q, k, v)):
            send[dst, j, :, :, :h].copy_(t[:, :, start : start + h])
        start += h
    received = all_to_all(send.flatten(0, 1), group, 0, 0).unflatten(0, (n, 3))
    qkv = received[..., :mine, :].movedim(0, 2).reshape(3, batch, n * local_len, mine, head_dim)
    return qkv.unbind(0)


def _heads_back(out: torch.Tensor, group: GroupCoordinator, sizes: tuple[int, ...]):
    """The inverse exchange for the output: ``[B, S, sizes[rank], D]`` to ``[B, S/P, H, D]``
    (uneven heads: padded to the largest, the padding dropped on arrival)."""
    largest = max(sizes)
    if min(sizes) == largest:
        return all_to_all(out, group, 1, 2)
    padded = F.pad(out, (0, 0, 0, largest - out.shape[2]))
    received = all_to_all(padded, group, 1, 2).unflatten(2, (group.world_size, largest))
    return torch.cat([received[:, :, src, :h] for src, h in enumerate(sizes)], 2)


def _local_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    valid: int,
    joint_k: torch.Tensor | None,
    joint_v: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """SDPA over the first ``valid`` tokens (padding trimmed) plus the joint tokens; the
    padded query rows of the result are zero."""
    length = q.shape[1]
    if valid < length:
        q, k, v = q[:, :valid], k[:, :valid], v[:, :valid]
    if joint_k is not None:
        k, v = torch.cat((k, joint_k), 1), torch.cat((v, joint_v), 1)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale
    ).transpose(1, 2)
    return F.pad(out, (0, 0, 0, 0, 0, length - valid)) if valid < length else out


# Ring attention ------------------------------------------------------------------


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group: GroupCoordinator | RingPeers,
    valid: list[int],
    joint_k: torch.Tensor | None = None,
    joint_v: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention of this ring rank's query block over every rank's K/V block.

    ``q, k, v``: ``[B, S_block, H, D]``, rank ``i`` of ``group`` holding block ``i``;
    ``valid[j]``: the number of real (unpadded) tokens at the start of block ``j``.
    ``joint_k/joint_v``: ``[B, L, H, D]`` local extra keys attended by every query.
    ``group`` may be other :class:`RingPeers` (such as :class:`vidpar.nn.testing.LocalRing`:
    rank 0's work with the blocks on one device), run as a plain autograd function.
    Each block runs on a fused kernel of :mod:`vidpar.nn.attention_kernels`. With a real
    group the whole ring (its exchanges overlapped with the blocks' kernels) is one custom
    op, forward and backward, so ``torch.compile`` traces it as one node of the graph.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if not isinstance(group, GroupCoordinator):
        return _RingAttention.apply(q, k, v, joint_k, joint_v, group, tuple(valid), scale)
    out, _ = torch.ops.vidpar.ring_attention(q, k, v, joint_k, joint_v, group.key, valid, scale)
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
    def forward(ctx, q, k, v, joint_k, joint_v, ring, valid, scale):
        out, lse = _ring_forward(q, k, v, joint_k, joint_v, ring, valid, scale)
        ctx.save_for_backward(q, k, v, joint_k, joint_v, out, lse)
        ctx.ring, ctx.valid, ctx.scale = ring, valid, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        grads = _ring_backward(dout, *ctx.saved_tensors, ctx.ring, ctx.valid, ctx.scale)
        return *grads, None, None, None


@torch.library.custom_op("vidpar::ring_attention", mutates_args=())
def _ring_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    joint_k: torch.Tensor | None,
    joint_v: torch.Tensor | None,
    group: str,
    valid: list[int],
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ring attention over the ring group ``group`` (a group's key): output and lse."""
    ring = _RingExchange(collective_ops.lookup(group))
    out, lse = _ring_forward(q, k, v, joint_k, joint_v, ring, tuple(valid), scale)
    return out, lse.contiguous()  # the kernels' lse may be a transposed view


@_ring_attention_op.register_fake
def _(q, k, v, joint_k, joint_v, group, valid, scale):
    batch, length, heads, _ = q.shape
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return q.new_empty(q.shape), q.new_empty((batch, heads, length), dtype=lse_dtype)


@torch.library.custom_op("vidpar::ring_attention_backward", mutates_args=())
def _ring_attention_backward_op(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    joint_k: torch.Tensor | None,
    joint_v: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    group: str,
    valid: list[int],
    scale: float,
) -> list[torch.Tensor]:
    """dq, dk, dv (and djoint_k, djoint_v when joint tokens were given) of the ring."""
    ring = _RingExchange(collective_ops.lookup(group))
    grads = _ring_backward(dout, q, k, v, joint_k, joint_v, out, lse, ring, tuple(valid), scale)
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


@_ring_attention_backward_op.register_fake
def _(dout, q, k, v, joint_k, joint_v, out, lse, group, valid, scale):
    inputs = (q, k, v) if joint_k is None else (q, k, v, joint_k, joint_v)
    return [t.new_empty(t.shape) for t in inputs]


def _save_ring_inputs(ctx, inputs, output) -> None:
    q, k, v, joint_k, joint_v, group, valid, scale = inputs
    ctx.save_for_backward(q, k, v, joint_k, joint_v, *output)
    ctx.group, ctx.valid, ctx.scale = group, valid, scale


def _ring_attention_grads(ctx, dout, _dlse):
    q, k, v, joint_k, joint_v, out, lse = ctx.saved_tensors
    grads = torch.ops.vidpar.ring_attention_backward(
        dout, q, k, v, joint_k, joint_v, out, lse, ctx.group, ctx.valid, ctx.scale
    )
    dq, dk, dv, *joint = grads
    djk, djv = joint if joint else (None, None)
    return dq, dk, dv, djk, djv, None, None, None


_ring_attention_op.register_autograd(_ring_attention_grads, setup_context=_save_ring_inputs)


def _ring_forward(q, k, v, joint_k, joint_v, ring, valid, scale):
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
            merge.add(*attention_forward(qh, jk, jv, scale))
        out, lse = merge.result()
        return out.transpose(1, 2).contiguous(), lse


def _ring_backward(dout, q, k, v, joint_k, joint_v, out, lse, ring, valid, scale):
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
            dqj, djk, djv = attention_backward(do, qh, jk, jv, oh, lse, scale)
            dq = dqj.to(dtype) if dq is None else dq.add_(dqj)
            djk, djv = djk.transpose(1, 2).to(joint_k.dtype), djv.transpose(1, 2).to(joint_v.dtype)
        return dq.transpose(1, 2).to(q.dtype), dk, dv, djk, djv
