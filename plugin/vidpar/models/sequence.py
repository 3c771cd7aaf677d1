"""Tokens sharded over sp once per forward, and the attention pieces that need it.

An adapter shards the video tokens after the patch embedding with
:func:`~vidpar.nn.dit.shard_tokens` (end-padded to a multiple of sp; the backward keeps
this rank's share) and gathers them before the output with
:func:`~vidpar.distributed.communication_op.gather_sequence`. In between, the attention
processors receive a :class:`TokenShard` where diffusers passes the rotary embedding:
this rank's slice of it plus the true token count, so padded keys are ignored. Being an
argument of every block, it travels with activation checkpointing's recomputation.

Text queries of joint attention (:func:`replicated_query_attention`) are held whole on
every sp rank while the video keys are sharded; each rank attends them to its own keys
and the partial results are merged exactly by their log-sum-exp.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from vidpar.distributed.communication_op import copy_to_group, gather_from_group
from vidpar.distributed.group import GroupCoordinator

__all__ = ["TokenShard", "local_length", "replicated_query_attention"]


class TokenShard(NamedTuple):
    """What a parallelised attention processor receives in place of the rotary embedding.

    ``rope``: this rank's ``(cos, sin)`` rows (end-padded like the tokens), or ``None``;
    ``seq_len``: the number of real tokens in the full sequence.
    """

    rope: tuple[torch.Tensor, torch.Tensor] | None
    seq_len: int


def local_length(seq_len: int, shard_len: int, group: GroupCoordinator) -> int:
    """How many real (unpadded) tokens this rank's shard of ``shard_len`` holds."""
    return max(0, min(shard_len, seq_len - group.rank_in_group * shard_len))


def _block(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q`` ``[B, H, L, D]`` over one key block ``[B, n, H, D]``: the output
    ``[B, H, L, D]`` and the log-sum-exp ``[B, H, L]`` of its scores."""
    k, v = k.transpose(1, 2).to(q.dtype), v.transpose(1, 2).to(q.dtype)
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    lse = torch.logsumexp(scores, dim=-1)
    return torch.matmul(torch.exp(scores - lse.unsqueeze(-1)), v), lse


def replicated_query_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group: GroupCoordinator,
    seq_len: int,
    extra_k: torch.Tensor | None = None,
    extra_v: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Softmax attention of queries that every rank of the sp ``group`` holds whole over
    the keys of the full sharded sequence plus ``extra`` keys every rank holds whole.

    Args:
        q: ``[B, L, H, D]``, the same on every rank (e.g. the text tokens).
        k, v: ``[B, S_local, H, D]``, this rank's end-padded shard of the sequence, of
            which ``seq_len`` tokens in all are real.
        extra_k, extra_v: ``[B, L', H, D]`` or ``None``.

    Returns ``[B, L, H, D]``, the same on every rank. With one rank it is plain SDPA.
    Otherwise each rank attends the queries to its real keys (scores ``[B, H, L, S_local]``
    in float32 or wider; ``L`` is the short text), all-gathers the outputs and log-sum-exps
    and merges them, with the extra block, by their softmax weights. The gathered results
    feed a computation every rank repeats while each rank's gradient of it is partial (as
    for every replicated tensor), so the backward sums those gradients over the group
    before each rank takes its own slice: a rank's keys get their full gradient.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    real = local_length(seq_len, k.shape[1], group)
    if group.world_size == 1:
        keys, values = k[:, :real], v[:, :real]
        if extra_k is not None:
            keys, values = torch.cat((extra_k, keys), 1), torch.cat((extra_v, values), 1)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2), scale=scale
        )
        return out.transpose(1, 2)
    dtype = torch.promote_types(q.dtype, torch.float32)
    qh = q.transpose(1, 2).to(dtype)
    if real > 0:
        out, lse = _block(qh, k[:, :real], v[:, :real], scale)
    else:  # a shard of padding only: a block of weight zero
        out = qh.new_zeros((*qh.shape[:-1], v.shape[-1]))
        lse = qh.new_full(qh.shape[:-1], float("-inf"))
    packed = torch.cat((out, lse.unsqueeze(-1)), -1).unsqueeze(0)
    gathered = copy_to_group(gather_from_group(packed, group, 0), group)  # [P, B, H, L, D+1]
    outs, lses = gathered[..., :-1], gathered[..., -1]
    if extra_k is not None:
        extra_out, extra_lse = _block(qh, extra_k, extra_v, scale)
        outs = torch.cat((outs, extra_out.unsqueeze(0)))
        lses = torch.cat((lses, extra_lse.unsqueeze(0)))
    weights = torch.softmax(lses, dim=0).unsqueeze(-1)
    return (weights * outs).sum(0).transpose(1, 2).to(q.dtype)
