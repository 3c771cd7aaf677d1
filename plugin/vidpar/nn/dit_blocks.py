"""The layers of a :class:`~vidpar.nn.dit.VideoDiT`: its transformer block and final layer.

Attention heads, QKV, projections and MLPs are split over tp; every self-attention is a
:class:`~vidpar.nn.attention.DistributedAttention` over the sp-sharded tokens. Norms,
modulation and residuals are the fused elementwise ops of :mod:`vidpar.nn.elementwise`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vidpar.distributed.full_weights import tensor_parallel_shard, tensor_parallel_sizes
from vidpar.distributed.group import GroupCoordinator
from vidpar.nn.attention import DistributedAttention
from vidpar.nn.dit_config import DiTConfig
from vidpar.nn.elementwise import (
    apply_rope,
    gated_residual,
    head_rms_norm,
    layer_norm_modulate,
    norm_rope,
)
from vidpar.nn.linear import (
    ColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    TensorParallelModule,
)

__all__ = ["DiTBlock", "FinalLayer", "HeadRMSNorm"]


class HeadRMSNorm(TensorParallelModule):
    """RMSNorm over each head's channels of ``[..., heads_local, head_dim]``, with a weight
    per head and channel. The weight is split over tp with the heads (its full shape is
    ``[num_heads, head_dim]``, whole heads as the projections split them), so its gradient
    needs no tp reduction."""

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        eps: float = 1e-6,
        *,
        group: GroupCoordinator | None = None,
    ) -> None:
        super().__init__(group)
        self.eps = eps
        full = torch.ones(num_heads, head_dim)
        sizes = tensor_parallel_sizes(num_heads, self.tp_group)
        shard = tensor_parallel_shard(full, 0, self.tp_group, sizes).clone()
        self.register_sharded("weight", shard, 0, sizes)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """The norm of ``x``, then the rotation by ``rope``'s tables if given."""
        if rope is None:
            return head_rms_norm(x, self.weight, self.eps)
        return norm_rope(x, self.weight, self.eps, *rope)


def _head_norms(cfg: DiTConfig) -> tuple[HeadRMSNorm | None, HeadRMSNorm | None]:
    if not cfg.qk_norm:
        return None, None
    return HeadRMSNorm(cfg.num_heads, cfg.head_dim, cfg.eps), HeadRMSNorm(
        cfg.num_heads, cfg.head_dim, cfg.eps
    )


class SelfAttention(nn.Module):
    """Fused QKV (tp by heads) -> per-head RMSNorm -> 3D RoPE -> DistributedAttention ->
    row-parallel output projection."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.qkv = QKVParallelLinear(cfg.hidden_size, cfg.num_heads)
        self.norm_q, self.norm_k = _head_norms(cfg)
        self.attn = DistributedAttention(cfg.num_heads)
        self.proj = RowParallelLinear(cfg.hidden_size, cfg.hidden_size, split_unit=cfg.head_dim)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], seq_len: int
    ) -> torch.Tensor:
        q, k, v = self.qkv(x)
        if self.norm_q is not None:
            q, k = self.norm_q(q, rope), self.norm_k(k, rope)
        else:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return self.proj(self.attn(q, k, v, seq_len=seq_len).flatten(-2))


class CrossAttention(nn.Module):
    """Attention from video tokens to the conditioning tokens. The context is replicated
    on every sp rank, so each rank attends its own queries with no communication."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        h, head_dim = cfg.hidden_size, cfg.head_dim
        self.to_q = ColumnParallelLinear(h, h, split_unit=head_dim)
        self.to_k = ColumnParallelLinear(h, h, split_unit=head_dim)
        self.to_v = ColumnParallelLinear(h, h, split_unit=head_dim)
        self.norm_q, self.norm_k = _head_norms(cfg)
        self.proj = RowParallelLinear(h, h, split_unit=head_dim)
        self.head_dim = cfg.head_dim

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        q = self.to_q(x).unflatten(-1, (-1, self.head_dim))
        k = self.to_k(context).unflatten(-1, (-1, self.head_dim))
        v = self.to_v(context).unflatten(-1, (-1, self.head_dim))
        if self.norm_q is not None:
            q, k = self.norm_q(q), self.norm_k(k)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        )
        return self.proj(out.transpose(1, 2).flatten(-2))


class MLP(nn.Module):
    """Column-parallel up projection, GELU, row-parallel down projection."""

    def __init__(self, hidden_size: int, mlp_hidden: int) -> None:
        super().__init__()
        # Channels split whole, unevenly when tp does not divide them (with uneven heads).
        self.fc1 = ColumnParallelLinear(hidden_size, mlp_hidden, split_unit=1)
        self.fc2 = RowParallelLinear(mlp_hidden, hidden_size, split_unit=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def _modulation_vectors(
    table: torch.Tensor, time_mod: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, ...]:
    """``table [1, n, h] + time_mod [B, n, h]`` (in at least float32: these are small) as
    ``n`` vectors ``[B, 1, h]`` in the activation ``dtype``."""
    wide = torch.promote_types(dtype, torch.float32)
    mod = (table.to(wide) + time_mod.to(wide)).to(dtype)
    return mod.unsqueeze(2).unbind(1)


class DiTBlock(nn.Module):
    """adaLN-modulated self-attention, cross-attention to the context, and MLP.

    ``modulation`` is this block's ``[1, 6, h]`` table added to the shared time
    projection (``cfg.modulation == "shared"``), or its own ``Linear(h, 6h)`` of the time
    embedding (``"per_block"``); :meth:`forward`'s ``time`` is that projection
    ``[B, 6, h]``, or the embedding ``[B, h]``.
    """

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.eps = cfg.eps
        self.shared = cfg.modulation == "shared"
        self.modulation = nn.Parameter(torch.zeros(1, 6, h)) if self.shared else nn.Linear(h, 6 * h)
        self.self_attn = SelfAttention(cfg)
        self.norm2 = nn.LayerNorm(h, eps=cfg.eps)
        self.cross_attn = CrossAttention(cfg)
        self.mlp = MLP(h, cfg.mlp_hidden)

    def forward(
        self,
        x: torch.Tensor,
        time: torch.Tensor,
        context: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        seq_len: int,
    ) -> torch.Tensor:
        if self.shared:
            mod = _modulation_vectors(self.modulation, time, x.dtype)
        else:
            mod = self.modulation(F.silu(time)).unflatten(-1, (6, -1)).unsqueeze(2).unbind(1)
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mod
        attn = self.self_attn(layer_norm_modulate(x, shift_a, scale_a, self.eps), rope, seq_len)
        x = gated_residual(x, gate_a, attn)
        x = x + self.cross_attn(self.norm2(x), context)
        mlp = self.mlp(layer_norm_modulate(x, shift_m, scale_m, self.eps))
        return gated_residual(x, gate_m, mlp)


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm and a linear map to patch pixels. The shift and scale
    are a learned ``[1, 2, h]`` table plus the time embedding (``"shared"``, as Wan), or a
    ``Linear(h, 2h)`` of it (``"per_block"``)."""

    def __init__(self, cfg: DiTConfig, out_features: int) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.eps = cfg.eps
        self.shared = cfg.modulation == "shared"
        self.modulation = nn.Parameter(torch.zeros(1, 2, h)) if self.shared else nn.Linear(h, 2 * h)
        self.linear = nn.Linear(h, out_features)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        if self.shared:
            shift, scale = _modulation_vectors(self.modulation, temb.unsqueeze(1), x.dtype)
        else:
            shift, scale = self.modulation(F.silu(temb)).unsqueeze(1).chunk(2, dim=-1)
        return self.linear(layer_norm_modulate(x, shift, scale, self.eps))
