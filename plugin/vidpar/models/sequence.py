"""Attention pieces for tokens sharded over sp (end-padded to a multiple of sp by the
plan's splits, :mod:`vidpar.models.plan`).

Text queries of joint attention (:func:`replicated_query_attention`) are held whole on
every sp rank while the video keys are sharded; each rank attends them to its own keys on
a fused kernel and the partial results are merged exactly by their log-sum-exp (one
``torch.library`` custom op forward and one backward, so compiled blocks keep it whole).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vidpar.distributed import collective_ops
from vidpar.distributed.group import GroupCoordinator
from vidpar.nn.attention_kernels import (
    attention_backward,
    attention_forward,
    heads_first,
    key_bias,
)
from vidpar.nn.softmax_merge import SoftmaxMerge

__all__ = ["local_length", "replicated_query_attention", "rotate_pairs"]


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """diffusers' real rotary embedding of interleaved channel pairs (``apply_rotary_emb``
    of CogVideoX, HunyuanVideo and LTX), in float32 or wider: ``cos``/``sin`` broadcast
    against ``x`` over its last dim."""
    real, imag = x.unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack((-imag, real), -1).flatten(-2)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def local_length(seq_len: int, shard_len: int, group: GroupCoordinator) -> int:
    """How many real (unpadded) tokens this rank's shard of ``shard_len`` holds."""
    return _real_tokens(seq_len, shard_len, group.rank_in_group)


def _real_tokens(seq_len: int, shard_len: int, rank: int) -> int:
    return max(0, min(shard_len, seq_len - rank * shard_len))


def replicated_query_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group: GroupCoordinator,
    seq_len: int,
    extra_k: torch.Tensor | None = None,
    extra_v: torch.Tensor | None = None,
    scale: float | None = None,
    extra_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax attention of queries that every rank of the sp ``group`` holds whole over
    the keys of the full sharded sequence plus ``extra`` keys every rank holds whole.

    Args:
        q: ``[B, L, H, D]``, the same on every rank (e.g. the text tokens).
        k, v: ``[B, S_local, H, D]``, this rank's end-padded shard of the sequence, of
            which ``seq_len`` tokens in all are real.
        extra_k, extra_v: ``[B, L', H, D]`` or ``None``.
        extra_mask: ``[B, L']`` bool, which extra keys count (default: all).

    Returns ``[B, L, H, D]``, the same on every rank. With one rank it is plain SDPA.
    Otherwise each rank attends the queries to its real keys on a fused kernel
    (:mod:`vidpar.nn.attention_kernels`), all-gathers the outputs and log-sum-exps and
    merges them, with the extra block, by their log-sum-exp in float32 (or wider). The
    backward sums the (partial, as for every replicated tensor) output gradient over the
    group and runs each block's fused backward with the final output and log-sum-exp: a
    rank's keys get their full gradient; the queries and extra keys get this rank's share.
    Forward and backward are each one ``torch.library`` custom op (their collectives
    inside), which ``torch.compile`` traces as one node.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if group.world_size == 1:
        real = local_length(seq_len, k.shape[1], group)
        keys, values, mask = k[:, :real], v[:, :real], None
        if extra_k is not None:
            keys, values = torch.cat((extra_k, keys), 1), torch.cat((extra_v, values), 1)
            if extra_mask is not None:
                video = extra_mask.new_ones((extra_mask.shape[0], real), dtype=torch.bool)
                mask = torch.cat((extra_mask.bool(), video), 1)[:, None, None]
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            keys.transpose(1, 2),
            values.transpose(1, 2),
            attn_mask=mask,
            scale=scale,
        )
        return out.transpose(1, 2)
    bias = None if extra_mask is None else key_bias(extra_mask, q.dtype)
    out, _ = torch.ops.vidpar.replicated_query_attention(
        q, k, v, extra_k, extra_v, bias, group.key, seq_len, scale
    )
    return out


@torch.library.custom_op("vidpar::replicated_query_attention", mutates_args=())
def _replicated_query_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    extra_k: torch.Tensor | None,
    extra_v: torch.Tensor | None,
    extra_bias: torch.Tensor | None,
    group: str,
    seq_len: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The output ``[B, L, H, D]`` and lse ``[B, H, L]`` over the sp group ``group`` (a
    group's key)."""
    sp = collective_ops.lookup(group)
    with torch.autocast(q.device.type, enabled=False):  # kernels in the input dtype
        reals = [_real_tokens(seq_len, k.shape[1], r) for r in range(sp.world_size)]
        real = reals[sp.rank_in_group]
        qh = heads_first(q)
        wide = torch.promote_types(q.dtype, torch.float32)
        packed = qh.new_zeros((*qh.shape[:-1], v.shape[-1] + 1), dtype=wide)
        if real > 0:
            out, lse = attention_forward(
                qh, heads_first(k[:, :real]), heads_first(v[:, :real]), scale
            )
            packed[..., :-1], packed[..., -1] = out, lse
        gathered = sp.all_gather(packed.unsqueeze(0), 0)  # [P, B, H, L, D + 1]
        merge = SoftmaxMerge()
        for part, n in zip(gathered, reals, strict=True):
            if n > 0:  # a shard of padding only holds no keys
                merge.add(part[..., :-1], part[..., -1])
        if extra_k is not None:
            extra = heads_first(extra_k), heads_first(extra_v)
            merge.add(*attention_forward(qh, *extra, scale, extra_bias))
        merged, lse = merge.result()
        out = q.new_empty(q.shape).transpose(1, 2).copy_(merged)  # [B, L, H, D] memory
    return out.transpose(1, 2), lse.contiguous()


@torch.library.custom_op("vidpar::replicated_query_attention_backward", mutates_args=())
def _replicated_query_backward_op(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    extra_k: torch.Tensor | None,
    extra_v: torch.Tensor | None,
    extra_bias: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    group: str,
    seq_len: int,
    scale: float,
) -> list[torch.Tensor]:
    """dq, dk, dv (and d extra_k, d extra_v when given) of the forward op."""
    sp = collective_ops.lookup(group)
    real = _real_tokens(seq_len, k.shape[1], sp.rank_in_group)
    with torch.autocast(dout.device.type, enabled=False):
        qh, oh, dout = heads_first(q), heads_first(out), dout.contiguous()
        full = heads_first(sp.all_reduce(dout.clone()))  # the replicated output's
        dq = torch.zeros(qh.shape, dtype=lse.dtype, device=q.device)
        dk, dv = torch.zeros_like(k), torch.zeros_like(v)
        if real > 0:
            kb, vb = heads_first(k[:, :real]), heads_first(v[:, :real])
            dqb, dkb, dvb = attention_backward(full, qh, kb, vb, oh, lse, scale)
            dq += dqb
            dk[:, :real], dv[:, :real] = dkb.transpose(1, 2), dvb.transpose(1, 2)
        grads = [dk, dv]
        if extra_k is not None:
            ek, ev = heads_first(extra_k), heads_first(extra_v)
            dqe, dek, dev = attention_backward(
                heads_first(dout), qh, ek, ev, oh, lse, scale, extra_bias
            )
            dq += dqe
            grads += [dek.transpose(1, 2).contiguous(), dev.transpose(1, 2).contiguous()]
    return [dq.transpose(1, 2).to(q.dtype).contiguous(), *grads]


collective_ops.register_group_attention(_replicated_query_op, _replicated_query_backward_op)
