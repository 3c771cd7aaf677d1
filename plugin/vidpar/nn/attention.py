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
* **Ring** (ring > 1): queries stay put while K/V blocks travel around the ring group
  (:mod:`vidpar.nn.ring_attention`).
* **USP** (both): Ulysses inside, ring outside. The sp rank is ``ring × ulysses_size +
  ulysses``, so after the Ulysses exchange the ulysses group holds ring block ``ring``.

sp = 1 is plain ``scaled_dot_product_attention`` with no communication. Padded keys (past
``seq_len``) are ignored. Extra keys/values replicated on every sp rank (``joint_k``,
``joint_v``: text tokens in Wan/HunyuanVideo-style joint attention) are attended by every
query; ``joint_mask`` (``[B, L]``, ``True`` for a key that counts) leaves a sample's padded
text keys out with static shapes (a score bias), as compiled code needs.

Gradients of tensors replicated over sp (``joint_k``/``joint_v`` and everything upstream
of them) are partial on each rank: each holds its own queries' share, and the sum over
the sp group is the full gradient, as the sequence-parallel gradient reduction of
replicated parameters expects.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vidpar.distributed.communication_op import all_to_all
from vidpar.distributed.group import GroupCoordinator
from vidpar.distributed.state import get_parallel_state
from vidpar.distributed.utils import split_sizes
from vidpar.nn.attention_kernels import key_bias
from vidpar.nn.linear import GroupRef
from vidpar.nn.ring_attention import ring_attention

__all__ = ["DistributedAttention"]


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
        joint_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention for this rank's queries; returns ``[B, S_local, H, D]``.

        Args:
            q, k, v: ``[B, S_local, H, D]``: this rank's sp shard of the (end-padded)
                sequence, with the tp-local heads.
            seq_len: true length of the full sequence; keys past it are padding and are
                ignored. Default: no padding (``S_local × sp``).
            joint_k, joint_v: ``[B, L, H, D]`` extra keys and values, the same on every sp
                rank (tp-local heads), attended by every query.
            joint_mask: ``[B, L]`` bool, which joint keys count (default: all).
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
        if joint_mask is not None and (joint_k is None or joint_mask.shape != joint_k.shape[:2]):
            raise ValueError(
                f"joint_mask must be [B, L] of joint_k's first dims, got "
                f"{tuple(joint_mask.shape)} for joint_k "
                f"{None if joint_k is None else tuple(joint_k.shape)}"
            )
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
            out = _local_attention(q, k, v, valid[0], joint_k, joint_v, joint_mask, scale)
        else:
            bias = None if joint_mask is None else key_bias(joint_mask, q.dtype)
            out = ring_attention(q, k, v, ring, valid, joint_k, joint_v, scale, bias)
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
    joint_mask: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """SDPA over the first ``valid`` tokens (padding trimmed) plus the joint tokens (those
    of ``joint_mask``); the padded query rows of the result are zero."""
    length = q.shape[1]
    if valid < length:
        q, k, v = q[:, :valid], k[:, :valid], v[:, :valid]
    mask = None
    if joint_mask is not None:
        video = joint_mask.new_ones((joint_mask.shape[0], valid), dtype=torch.bool)
        mask = torch.cat((video, joint_mask.bool()), 1)[:, None, None]
    if joint_k is not None:
        k, v = torch.cat((k, joint_k), 1), torch.cat((v, joint_v), 1)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale
    ).transpose(1, 2)
    return F.pad(out, (0, 0, 0, 0, 0, length - valid)) if valid < length else out
