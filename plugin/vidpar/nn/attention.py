"""DistributedAttention: exact softmax attention over a sequence sharded across the sp group.

Each rank holds ``S/sp`` tokens of the sequence (the sp shard of
:func:`~vidpar.distributed.communication_op.shard_sequence`, zero-padded at the end) and the
tp-local heads. The layout picks the mode:

* **Ulysses** (ulysses > 1): an all-to-all trades the sequence shard for a head shard, so
  every rank attends over the whole sequence with ``heads/ulysses`` heads, and back.
* **Ring** (ring > 1): queries stay put while K/V blocks travel around the ring group;
  block results are merged with their log-sum-exp (online softmax). Its backward passes
  K/V and the dK/dV accumulators around the ring the same way.
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

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from vidpar.distributed import telemetry
from vidpar.distributed.communication_op import all_to_all
from vidpar.distributed.group import GroupCoordinator
from vidpar.distributed.state import get_parallel_state
from vidpar.nn.linear import GroupRef

__all__ = ["DistributedAttention", "ring_attention"]


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
        if heads % u:
            raise ValueError(
                f"the layer got {heads} heads per tp rank, not divisible by ulysses({u})"
            )
        scale = head_dim**-0.5 if self.scale is None else self.scale

        if u > 1:
            # [3, B, S/P, H, D] -> [3, B, S, H/P, D]: one all-to-all for q, k and v.
            q, k, v = all_to_all(torch.stack((q, k, v)), uly, 3, 2).unbind(0)
            if joint_k is not None:
                h = heads // u
                joint_k = joint_k.narrow(2, uly.rank_in_group * h, h)
                joint_v = joint_v.narrow(2, uly.rank_in_group * h, h)
        block = q.shape[1]  # this ring rank's block of the sequence after Ulysses
        valid = [max(0, min(block, seq_len - j * block)) for j in range(r)]
        if r == 1:
            out = _local_attention(q, k, v, valid[0], joint_k, joint_v, scale)
        else:
            out = ring_attention(q, k, v, ring, valid, joint_k, joint_v, scale)
        if u > 1:
            out = all_to_all(out, uly, 1, 2)
        return out


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
    group: GroupCoordinator,
    valid: list[int],
    joint_k: torch.Tensor | None = None,
    joint_v: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention of this ring rank's query block over every rank's K/V block.

    ``q, k, v``: ``[B, S_block, H, D]``, rank ``i`` of ``group`` holding block ``i``;
    ``valid[j]``: the number of real (unpadded) tokens at the start of block ``j``.
    ``joint_k/joint_v``: ``[B, L, H, D]`` local extra keys attended by every query.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _RingAttention.apply(q, k, v, joint_k, joint_v, group, tuple(valid), scale)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _heads_first(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[B, S, H, D] -> [B, H, S, D]`` in the compute dtype."""
    return x.transpose(1, 2).to(dtype)


def _block_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One block of attention (``[B, H, S, D]``): its output and log-sum-exp per query."""
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    lse = torch.logsumexp(scores, dim=-1)
    return torch.matmul(torch.exp(scores - lse.unsqueeze(-1)), v), lse


def _block_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lse: torch.Tensor,
    delta: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv of one block, given the final log-sum-exp and ``delta = rowsum(dout·out)``."""
    p = torch.exp(torch.matmul(q, k.transpose(-2, -1)) * scale - lse.unsqueeze(-1))
    dv = torch.matmul(p.transpose(-2, -1), dout)
    ds = p * (torch.matmul(dout, v.transpose(-2, -1)) - delta.unsqueeze(-1))
    return torch.matmul(ds, k) * scale, torch.matmul(ds.transpose(-2, -1), q) * scale, dv


def _merge(
    out: torch.Tensor | None,
    lse: torch.Tensor | None,
    block_out: torch.Tensor,
    block_lse: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two partial softmax results by their log-sum-exps."""
    if out is None:
        return block_out, block_lse
    new_lse = torch.logaddexp(lse, block_lse)
    out = out * torch.exp(lse - new_lse).unsqueeze(-1)
    return out + block_out * torch.exp(block_lse - new_lse).unsqueeze(-1), new_lse


class _RingExchange:
    """Send a tensor to the next rank of a ring group and receive one of the same shape
    from the previous rank, asynchronously (one batched isend/irecv pair)."""

    def __init__(self, group: GroupCoordinator) -> None:
        self.group = group
        self.next = group.ranks[group.next_rank]
        self.prev = group.ranks[group.prev_rank]

    def start(self, tensor: torch.Tensor, tag: int) -> _Pending:
        tensor = tensor.contiguous()
        received = torch.empty_like(tensor)
        pg = self.group.device_group
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


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, joint_k, joint_v, group: GroupCoordinator, valid, scale):
        with torch.autocast(q.device.type, enabled=False):  # the math is float32/64 on purpose
            return _RingAttention._forward(ctx, q, k, v, joint_k, joint_v, group, valid, scale)

    @staticmethod
    def backward(ctx, dout):
        with torch.autocast(dout.device.type, enabled=False):
            return _RingAttention._backward(ctx, dout)

    @staticmethod
    def _forward(ctx, q, k, v, joint_k, joint_v, group: GroupCoordinator, valid, scale):
        rank, size = group.rank_in_group, group.world_size
        dtype = _compute_dtype(q.dtype)
        qh = _heads_first(q, dtype)
        kv = torch.stack((k, v))
        exchange = _RingExchange(group)
        out = lse = None
        for step in range(size):
            pending = exchange.start(kv, tag=0) if step < size - 1 else None
            n = valid[(rank - step) % size]  # this step's block came from rank - step
            if n > 0:
                kb, vb = (_heads_first(t[:, :n], dtype) for t in kv)
                out, lse = _merge(out, lse, *_block_forward(qh, kb, vb, scale))
            if pending is not None:
                kv = pending.wait()
        if joint_k is not None:
            jk, jv = _heads_first(joint_k, dtype), _heads_first(joint_v, dtype)
            out, lse = _merge(out, lse, *_block_forward(qh, jk, jv, scale))
        ctx.save_for_backward(q, k, v, joint_k, joint_v, out, lse)
        ctx.group, ctx.valid, ctx.scale = group, valid, scale
        return out.transpose(1, 2).to(q.dtype).contiguous()

    @staticmethod
    def _backward(ctx, dout):
        q, k, v, joint_k, joint_v, out, lse = ctx.saved_tensors
        group, valid, scale = ctx.group, ctx.valid, ctx.scale
        rank, size = group.rank_in_group, group.world_size
        dtype = out.dtype
        qh, do = _heads_first(q, dtype), _heads_first(dout, dtype)
        delta = (do * out).sum(-1)
        dq = torch.zeros_like(qh)
        kv = torch.stack((k, v))
        exchange = _RingExchange(group)
        grads = None  # dK/dV accumulated for the block held, travelling with it
        for step in range(size):
            kv_pending = exchange.start(kv, tag=0) if step < size - 1 else None
            n = valid[(rank - step) % size]
            block_grads = kv.new_zeros(kv.shape, dtype=dtype)  # [2, B, S, H, D]
            if n > 0:
                kb, vb = (_heads_first(t[:, :n], dtype) for t in kv)
                dqb, dkb, dvb = _block_backward(do, qh, kb, vb, lse, delta, scale)
                dq += dqb
                block_grads[0, :, :n] = dkb.transpose(1, 2)
                block_grads[1, :, :n] = dvb.transpose(1, 2)
            if grads is not None:
                block_grads += grads.wait()
            grads = exchange.start(block_grads, tag=1)
            if kv_pending is not None:
                kv = kv_pending.wait()
        dk, dv = grads.wait().to(k.dtype).unbind(0)  # this rank's own block, complete
        djk = djv = None
        if joint_k is not None:
            jk, jv = _heads_first(joint_k, dtype), _heads_first(joint_v, dtype)
            dqj, djk, djv = _block_backward(do, qh, jk, jv, lse, delta, scale)
            dq += dqj
            djk, djv = djk.transpose(1, 2).to(joint_k.dtype), djv.transpose(1, 2).to(joint_v.dtype)
        return dq.transpose(1, 2).to(q.dtype), dk, dv, djk, djv, None, None, None
