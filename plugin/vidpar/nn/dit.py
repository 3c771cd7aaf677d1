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

import torch
from torch import nn

from vidpar.distributed.communication_op import gather_sequence
from vidpar.distributed.full_weights import load_full_weights
from vidpar.distributed.group import GroupCoordinator
from vidpar.distributed.state import get_parallel_state
from vidpar.distributed.utils import pad_to_multiple, split_tensor_along_dim
from vidpar.nn.activation_checkpointing import check_checkpointing
from vidpar.nn.dit_blocks import DiTBlock, FinalLayer
from vidpar.nn.dit_config import DiTConfig
from vidpar.nn.elementwise import rope_tables
from vidpar.nn.linear import GroupRef
from vidpar.nn.regional_compile import block_runner

__all__ = ["DiTConfig", "VideoDiT", "rope_angles", "shard_tokens", "timestep_embedding"]


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


class VideoDiT(nn.Module):
    """A class- or text-conditioned video DiT, parallel over the current layout.

    ``forward(x, timestep, cond)``: ``x`` ``[B, C, T, H, W]`` (T, H, W divisible by the
    patch), ``timestep`` ``[B]`` (or a scalar) in [0, 1], ``cond`` either class labels
    (integer ``[B]``, ``num_classes`` = null) or text embeddings ``[B, L, context_dim]``.
    Returns ``[B, out_channels, T, H, W]``, the same on every rank of a tp/sp group.

    The adaLN modulations and the final projection start at zero (each block starts as
    the identity), as in DiT. With ``config.compile`` the blocks run through one compiled
    block (:func:`~vidpar.nn.regional_compile.block_runner`).
    """

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        self.config = cfg = config
        state = get_parallel_state()
        state.check_heads(cfg.num_heads)  # where the model meets the layout
        check_checkpointing(cfg.activation_checkpointing, state.group("ring").world_size)
        self._sp = GroupRef(state.group("sp"))
        h = cfg.hidden_size
        self.patch_embed = nn.Conv3d(
            cfg.in_channels, h, kernel_size=cfg.patch_size, stride=cfg.patch_size
        )
        self.time_embed = nn.Sequential(nn.Linear(cfg.freq_dim, h), nn.SiLU(), nn.Linear(h, h))
        # "shared": one projection of the time for every block's modulation (Wan).
        self.time_proj = (
            nn.Sequential(nn.SiLU(), nn.Linear(h, 6 * h)) if cfg.modulation == "shared" else None
        )
        self.class_embed = (
            nn.Embedding(cfg.num_classes + 1, cfg.context_len * cfg.context_dim)
            if cfg.num_classes > 0
            else None
        )
        self.context_embed = nn.Sequential(
            nn.Linear(cfg.context_dim, h), nn.GELU(approximate="tanh"), nn.Linear(h, h)
        )
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.depth))
        self.final = FinalLayer(cfg, math.prod(cfg.patch_size) * cfg.out_channels)
        self._zero_init()

    @torch.no_grad()
    def _zero_init(self) -> None:
        if self.class_embed is not None:
            nn.init.normal_(self.class_embed.weight, std=0.02)
        modulations = [b.modulation for b in self.blocks] + [self.final.modulation]
        if self.time_proj is not None:
            modulations.append(self.time_proj[1])
        for module in [*modulations, self.final.linear]:
            for param in module.parameters() if isinstance(module, nn.Module) else [module]:
                nn.init.zeros_(param)

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
        self, grid: tuple[int, int, int], device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotary tables of this rank's token shard, padded like the tokens (padding:
        angle 0)."""
        angles = rope_angles(grid, self.config.head_dim, self.config.rope_theta, device)
        return rope_tables(shard_tokens(angles, self.sp_group, dim=0), dtype)

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
        time = temb if self.time_proj is None else self.time_proj(temb).unflatten(-1, (6, -1))
        context = self._context(cond, dtype)
        rope = self._rope(grid, x.device, dtype)

        sp = self.sp_group
        # Sharded once, and laid out token-major: the convolution's output, transposed, is
        # a channel-major view, through which every norm would copy and every residual
        # add would stride (8 % of a Wan-sized eager forward on one H200).
        tokens = shard_tokens(tokens, sp, dim=1).contiguous()  # ...
        checkpointing = cfg.activation_checkpointing if torch.is_grad_enabled() else False
        run = block_runner(cfg.compile, checkpointing)
        for block in self.blocks:
            tokens = run(block, tokens, time, context, rope, num_tokens)
        out = gather_sequence(self.final(tokens, temb), sp, num_tokens, dim=1)  # ... gathered once
        return self.unpatchify(out, grid)

    def unpatchify(self, tokens: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """``[B, t·h·w, pt·ph·pw·C] -> [B, C, t·pt, h·ph, w·pw]``."""
        t, h, w = grid
        pt, ph, pw = self.config.patch_size
        c = self.config.out_channels
        x = tokens.reshape(tokens.shape[0], t, h, w, pt, ph, pw, c)
        return x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(tokens.shape[0], c, t * pt, h * ph, w * pw)
