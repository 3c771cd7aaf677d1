"""Parallel building blocks: tensor-parallel linears, distributed attention, a video DiT.

Layers take their groups from the current layout (a world of one without one); full
single-device weights of sharded models are in :mod:`vidpar.distributed.full_weights`.
"""

from vidpar.nn.attention import DistributedAttention
from vidpar.nn.dit import DiTConfig, VideoDiT, shard_tokens
from vidpar.nn.linear import (
    ColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    TensorParallelModule,
)
from vidpar.nn.ring_attention import ring_attention

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
