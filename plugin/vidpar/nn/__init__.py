"""Parallel building blocks: tensor-parallel linears, distributed attention, a video DiT.

Layers take their groups from the current layout (or run as one process without one);
see :mod:`vidpar.nn.linear` for the ``tensor_parallel_dim`` contract and full checkpoints.
"""

from vidpar.nn.attention import DistributedAttention, check_heads, ring_attention
from vidpar.nn.dit import DiTConfig, VideoDiT, shard_tokens
from vidpar.nn.linear import (
    ColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    TensorParallelModule,
    full_state_dict,
    load_full_state_dict,
    load_full_weights,
    mark_tensor_parallel,
    resolve_group,
    save_full_weights,
    single_process,
)

__all__ = [
    "ColumnParallelLinear",
    "DiTConfig",
    "DistributedAttention",
    "QKVParallelLinear",
    "RowParallelLinear",
    "TensorParallelModule",
    "VideoDiT",
    "check_heads",
    "full_state_dict",
    "load_full_state_dict",
    "load_full_weights",
    "mark_tensor_parallel",
    "resolve_group",
    "ring_attention",
    "save_full_weights",
    "shard_tokens",
    "single_process",
]
