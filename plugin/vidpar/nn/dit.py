"""A small Wan-style video diffusion transformer built from vidpar's parallel layers.

``VideoDiT(config)(x, timestep, cond)`` maps a latent video ``[B, C, T, H, W]``, a flow
time ``t`` in [0, 1] and a condition (class labels or text embeddings) to a tensor of the
same shape as ``x``. Under the current layout (see :mod:`vidpar.nn.linear` for how
layers find their groups) attention heads, QKV, projections and MLPs are split over tp;
the token sequence is sharded over sp once after the patch embedding and gathered once
before unpatchifying, and every self-attention is a :class:`DistributedAttention`.
Everything else (embeddings, adaLN modulation, norms, final layer) is replicated.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from vidpar.distributed.communication_op import gather_sequence
from vidpar.distributed.full_weights import load_full_weights, tensor_parallel_shard
from vidpar.distributed.group import GroupCoordinator
from vidpar.distributed.state import get_parallel_state
from vidpar.distributed.utils import pad_to_multiple, split_tensor_along_dim
from vidpar.nn.attention import DistributedAttention
from vidpar.nn.linear import (
    ColumnParallelLinear,
    GroupRef,
    QKVParallelLinear,
    RowParallelLinear,
    TensorParallelModule,
)

__all__ = [
    "DiTConfig",
    "HeadRMSNorm",
    "VideoDiT",
    "rope_angles",
    "shard_tokens",
    "timestep_embedding",
]


@dataclass
class DiTConfig:
    """Sizes of a :class:`VideoDiT`.

    ``num_classes > 0`` makes the model class-conditional: label ``num_classes`` is the
    null class for classifier-free guidance, and each label becomes ``context_len`` tokens
    of width ``context_dim``. Text embeddings ``[B, L, context_dim]`` are accepted either
    way. ``activation_checkpointing`` recomputes each block's activations in the backward
    pass (with their collectives) instead of keeping them: far less memory for long videos,
    about a third more compute; it changes no weight or result.
    """

    in_channels: int = 4
    patch_size: tuple[int, int, int] = (1, 2, 2)
    hidden_size: int = 64
    num_heads: int = 4
    depth: int = 2
    mlp_ratio: float = 4.0
    num_classes: int = 0
    context_dim: int = 64
    context_len: int = 4
    out_channels: int | None = None
    qk_norm: bool = True
    rope_theta: float = 10000.0
    freq_dim: int = 256
    eps: float = 1e-6
    activation_checkpointing: bool = False

    def __post_init__(self) -> None:
        self.patch_size = tuple(int(p) for p in self.patch_size)
        if len(self.patch_size) != 3:
            raise ValueError(f"patch_size must be (t, h, w), got {self.patch_size}")
        if self.out_channels is None:
            self.out_channels = self.in_channels
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 2:
            raise ValueError(
                f"hidden_size({self.hidden_size}) must be num_heads({self.num_heads}) × an "
                "even head_dim"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding ``[B, dim]`` of times ``t`` ``[B]`` (cos half, then sin)."""
    dtype = torch.promote_types(t.dtype, torch.float32)
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=dtype, device=t.device) / half
    )
    args = t.to(dtype)[:, None] * freqs[None]
    return torch.cat((torch.cos(args), torch.sin(args)), dim=-1)


def rope_angles(
    grid: tuple[int, int, int], head_dim: int, theta: float = 10000.0, device=None
) -> torch.Tensor:
    """Rotary angles ``[t·h·w, head_dim/2]`` (float64) for a ``(t, h, w)`` token grid in
    row-major order. The rotated pairs are split over the axes: a third each for h and w,
    the rest for t (as Wan)."""
    pairs = head_dim // 2
    ph = pw = pairs // 3
    per_axis = []
    for axis, (n, k) in enumerate(zip(grid, (pairs - ph - pw, ph, pw), strict=True)):
        inv = theta ** (-torch.arange(k, dtype=torch.float64, device=device) / max(k, 1))
        angles = torch.arange(n, dtype=torch.float64, device=device)[:, None] * inv[None]
        shape = [1, 1, 1, k]
        shape[axis] = n
        per_axis.append(angles.view(shape).expand(*grid, k))
    return torch.cat(per_axis, dim=-1).reshape(-1, pairs)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive channel pairs of ``x`` ``[B, S, H, D]`` by angles ``[S, D/2]``."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    x0, x1 = x.to(dtype).unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[:, None].to(dtype), sin[:, None].to(dtype)
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2).to(x.dtype)


def shard_tokens(x: torch.Tensor, group: GroupCoordinator, dim: int = 1) -> torch.Tensor:
    """This rank's shard of a sequence, end-padded to a multiple of the group size (the
    layout of :func:`~vidpar.distributed.communication_op.shard_sequence`), by plain
    slicing.

    The backward keeps this rank's share of the gradient (zeros elsewhere), so the
    parameters upstream (the patch embedding) get a partial gradient like every other
    replicated parameter, and the sum over sp done by the gradient reduction is exact.
    ``shard_sequence`` all-gathers the gradient instead, which that sum would count sp
    times.
    """
    if group.world_size == 1:
        return x
    padded, _ = pad_to_multiple(x, group.world_size, dim)
    return split_tensor_along_dim(padded, group.world_size, dim)[group.rank_in_group]


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class HeadRMSNorm(TensorParallelModule):
    """RMSNorm over each head's channels of ``[..., heads_local, head_dim]``, with a weight
    per head and channel. The weight is split over tp with the heads (its full shape is
    ``[num_heads, head_dim]``), so its gradient needs no tp reduction."""

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
        self.register_sharded("weight", tensor_parallel_shard(full, 0, self.tp_group).clone(), 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)
        y = x.to(dtype)
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return y.to(x.dtype) * self.weight


class SelfAttention(nn.Module):
    """Fused QKV (tp by heads) -> per-head RMSNorm -> 3D RoPE -> DistributedAttention ->
    row-parallel output projection."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.qkv = QKVParallelLinear(cfg.hidden_size, cfg.num_heads)
        self.norm_q = HeadRMSNorm(cfg.num_heads, cfg.head_dim, cfg.eps) if cfg.qk_norm else None
        self.norm_k = HeadRMSNorm(cfg.num_heads, cfg.head_dim, cfg.eps) if cfg.qk_norm else None
        self.attn = DistributedAttention(cfg.num_heads)
        self.proj = RowParallelLinear(cfg.hidden_size, cfg.hidden_size)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], seq_len: int
    ) -> torch.Tensor:
        q, k, v = self.qkv(x)
        if self.norm_q is not None:
            q, k = self.norm_q(q), self.norm_k(k)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return self.proj(self.attn(q, k, v, seq_len=seq_len).flatten(-2))


class CrossAttention(nn.Module):
    """Attention from video tokens to the conditioning tokens. The context is replicated
    on every sp rank, so each rank attends its own queries with no communication."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.to_q = ColumnParallelLinear(h, h)
        self.to_k = ColumnParallelLinear(h, h)
        self.to_v = ColumnParallelLinear(h, h)
        self.norm_q = HeadRMSNorm(cfg.num_heads, cfg.head_dim, cfg.eps) if cfg.qk_norm else None
        self.norm_k = HeadRMSNorm(cfg.num_heads, cfg.head_dim, cfg.eps) if cfg.qk_norm else None
        self.proj = RowParallelLinear(h, h)
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
        self.fc1 = ColumnParallelLinear(hidden_size, mlp_hidden)
        self.fc2 = RowParallelLinear(mlp_hidden, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """adaLN-modulated self-attention, cross-attention to the context, and MLP."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.modulation = nn.Linear(h, 6 * h)
        self.norm1 = nn.LayerNorm(h, eps=cfg.eps, elementwise_affine=False)
        self.self_attn = SelfAttention(cfg)
        self.norm2 = nn.LayerNorm(h, eps=cfg.eps)
        self.cross_attn = CrossAttention(cfg)
        self.norm3 = nn.LayerNorm(h, eps=cfg.eps, elementwise_affine=False)
        self.mlp = MLP(h, cfg.mlp_hidden)

    def forward(
        self,
        x: torch.Tensor,
        temb: torch.Tensor,
        context: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        seq_len: int,
    ) -> torch.Tensor:
        mod = self.modulation(F.silu(temb)).unsqueeze(1).chunk(6, dim=-1)
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mod
        x = x + gate_a * self.self_attn(modulate(self.norm1(x), shift_a, scale_a), rope, seq_len)
        x = x + self.cross_attn(self.norm2(x), context)
        return x + gate_m * self.mlp(modulate(self.norm3(x), shift_m, scale_m))


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm and a linear map to patch pixels."""

    def __init__(self, hidden_size: int, out_features: int, eps: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, eps=eps, elementwise_affine=False)
        self.modulation = nn.Linear(hidden_size, 2 * hidden_size)
        self.linear = nn.Linear(hidden_size, out_features)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        shift, scale = self.modulation(F.silu(temb)).unsqueeze(1).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class VideoDiT(nn.Module):
    """A class- or text-conditioned video DiT, parallel over the current layout.

    ``forward(x, timestep, cond)``: ``x`` ``[B, C, T, H, W]`` (T, H, W divisible by the
    patch), ``timestep`` ``[B]`` (or a scalar) in [0, 1], ``cond`` either class labels
    (integer ``[B]``, ``num_classes`` = null) or text embeddings ``[B, L, context_dim]``.
    Returns ``[B, out_channels, T, H, W]``, the same on every rank of a tp/sp group.

    The adaLN modulations and the final projection start at zero (each block starts as
    the identity), as in DiT.
    """

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        self.config = cfg = config
        state = get_parallel_state()
        state.check_heads(cfg.num_heads)  # where the model meets the layout
        self._sp = GroupRef(state.group("sp"))
        h = cfg.hidden_size
        self.patch_embed = nn.Conv3d(
            cfg.in_channels, h, kernel_size=cfg.patch_size, stride=cfg.patch_size
        )
        self.time_embed = nn.Sequential(nn.Linear(cfg.freq_dim, h), nn.SiLU(), nn.Linear(h, h))
        self.class_embed = (
            nn.Embedding(cfg.num_classes + 1, cfg.context_len * cfg.context_dim)
            if cfg.num_classes > 0
            else None
        )
        self.context_embed = nn.Sequential(
            nn.Linear(cfg.context_dim, h), nn.GELU(approximate="tanh"), nn.Linear(h, h)
        )
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.depth))
        self.final = FinalLayer(h, math.prod(cfg.patch_size) * cfg.out_channels, cfg.eps)
        self._zero_init()

    @torch.no_grad()
    def _zero_init(self) -> None:
        if self.class_embed is not None:
            nn.init.normal_(self.class_embed.weight, std=0.02)
        for layer in [
            *(b.modulation for b in self.blocks),
            self.final.modulation,
            self.final.linear,
        ]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    @property
    def sp_group(self) -> GroupCoordinator:
        return self._sp.group

    @classmethod
    def from_full_state_dict(
        cls,
        config: DiTConfig,
        source: str | os.PathLike | Mapping[str, torch.Tensor],
        *,
        strict: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> VideoDiT:
        """Build for the current layout (on ``device``, in ``dtype``) and load a
        single-device checkpoint (a state dict or a ``.safetensors`` path); each rank
        keeps its tp shards."""
        model = cls(config).to(device=device, dtype=dtype)
        load_full_weights(model, source, strict=strict)
        return model

    def _context(self, cond: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        cfg = self.config
        if cond.is_floating_point():
            if cond.dim() != 3 or cond.shape[-1] != cfg.context_dim:
                raise ValueError(
                    f"text conditioning must be [B, L, {cfg.context_dim}], got {tuple(cond.shape)}"
                )
            tokens = cond
        else:
            if self.class_embed is None:
                raise ValueError(
                    "this model has no classes (num_classes=0): pass text embeddings "
                    f"[B, L, {cfg.context_dim}]"
                )
            tokens = self.class_embed(cond).view(-1, cfg.context_len, cfg.context_dim)
        return self.context_embed(tokens.to(dtype))

    def _rope(
        self, grid: tuple[int, int, int], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of this rank's token shard, padded like the tokens (padding: angle 0)."""
        angles = rope_angles(grid, self.config.head_dim, self.config.rope_theta, device)
        angles = shard_tokens(angles, self.sp_group, dim=0)
        return torch.cos(angles), torch.sin(angles)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        batch, _, frames, height, width = x.shape
        pt, ph, pw = cfg.patch_size
        if frames % pt or height % ph or width % pw:
            raise ValueError(
                f"video size (T, H, W) = {(frames, height, width)} is not divisible by "
                f"patch_size {cfg.patch_size}"
            )
        grid = (frames // pt, height // ph, width // pw)
        num_tokens = math.prod(grid)
        dtype = self.patch_embed.weight.dtype

        tokens = self.patch_embed(x.to(dtype)).flatten(2).transpose(1, 2)  # [B, N, hidden]
        timestep = torch.as_tensor(timestep, device=x.device)
        timestep = timestep.expand(batch) if timestep.dim() == 0 else timestep
        temb = self.time_embed(timestep_embedding(timestep * 1000, cfg.freq_dim).to(dtype))
        context = self._context(cond, dtype)
        rope = self._rope(grid, x.device)

        sp = self.sp_group
        tokens = shard_tokens(tokens, sp, dim=1)  # sharded once ...
        recompute = cfg.activation_checkpointing and torch.is_grad_enabled()
        for block in self.blocks:
            if recompute:
                tokens = checkpoint(
                    block, tokens, temb, context, rope, num_tokens, use_reentrant=False
                )
            else:
                tokens = block(tokens, temb, context, rope, num_tokens)
        out = gather_sequence(self.final(tokens, temb), sp, num_tokens, dim=1)  # ... gathered once
        return self.unpatchify(out, grid)

    def unpatchify(self, tokens: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """``[B, t·h·w, pt·ph·pw·C] -> [B, C, t·pt, h·ph, w·pw]``."""
        t, h, w = grid
        pt, ph, pw = self.config.patch_size
        c = self.config.out_channels
        x = tokens.reshape(tokens.shape[0], t, h, w, pt, ph, pw, c)
        return x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(tokens.shape[0], c, t * pt, h * ph, w * pw)
