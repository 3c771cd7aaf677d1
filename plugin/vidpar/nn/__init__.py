"""Parallel building blocks: tensor-parallel linears, distributed attention, a video DiT.

Layers take their groups from the current layout (a world of one without one); full
single-device weights of sharded models are in :mod:`vidpar.distributed.full_weights`.
"""

from vidpar.nn.attention import DistributedAttention, ring_attention
from vidpar.nn.dit import DiTConfig, VideoDiT, shard_tokens
from vidpar.nn.linear import (
    ColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    TensorParallelModule,
)

__all__ = [
    "ColumnParallelLinear",
    "DiTConfig",
    "DistributedAttention",
    "QKVParallelLinear",
    "RowParallelLinear",
    "TensorParallelModule",
    "VideoDiT",
    "ring_attention",
    "shard_tokens",
]
