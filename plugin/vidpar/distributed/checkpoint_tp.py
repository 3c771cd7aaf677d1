"""Tensor-parallel shards as DCP sees them, and back: a module's and its optimizer's
states with every tp shard (a parameter carrying ``tensor_parallel_dim``) as a piece of
the full tensor (a DTensor over the tp mesh dimension; shards of uneven size, whole heads
that tp does not divide, as ShardedTensors stating each rank's offset), so that DCP
reshards a checkpoint into any tp layout; and the local shards again after a load."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.distributed._shard.sharded_tensor import Shard as LocalShard
from torch.distributed._shard.sharded_tensor import (
    ShardedTensor,
    ShardMetadata,
    init_from_local_shards,
)
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
from torch.distributed.tensor import DTensor, Shard

from vidpar.distributed import state as ps
from vidpar.distributed.full_weights import shard_sizes


def tp_dims(module: torch.nn.Module) -> dict[str, int]:
    """The dimension each tp-sharded parameter is split along, by name."""
    return {
        name: param.tensor_parallel_dim
        for name, param in module.named_parameters()
        if getattr(param, "tensor_parallel_dim", None) is not None
    }


def _tp_mesh():
    state = ps.get_parallel_state()
    return state.mesh["tp"] if state.parallel.tp > 1 else None


def tp_sizes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Every tp rank's size of the shards split unevenly (whole heads), by name."""
    return {
        name: sizes for name, param in module.named_parameters() if (sizes := shard_sizes(param))
    }


def _as_global(
    tensor: torch.Tensor, dim: int, mesh, sizes: tuple[int, ...] | None = None
) -> DTensor | ShardedTensor:
    """This rank's tp shard as a piece of the full tensor: a DTensor, or for uneven
    ``sizes`` a ShardedTensor that states this rank's offset (DTensor places uneven
    shards as ``torch.chunk`` does, not whole heads with the first ranks one more)."""
    shape = list(tensor.shape)
    if sizes is not None:
        rank = mesh.get_local_rank()
        offsets = [0] * tensor.dim()
        offsets[dim] = sum(sizes[:rank])
        shape[dim] = sum(sizes)
        where = ShardMetadata(
            offsets, list(tensor.shape), f"rank:{dist.get_rank()}/{tensor.device}"
        )
        return init_from_local_shards(
            [LocalShard(tensor, where)], shape, process_group=mesh.get_group()
        )
    shape[dim] *= mesh.size()
    return DTensor.from_local(
        tensor,
        mesh,
        [Shard(dim)],
        run_check=False,
        shape=torch.Size(shape),
        stride=torch.empty(shape, device="meta").stride(),
    )


def model_state(module: torch.nn.Module) -> dict[str, Any]:
    """The module's state, tp shards wrapped as DTensors (sharing the parameters' storage)."""
    state = module.state_dict()
    mesh = _tp_mesh()
    if mesh is not None:
        sizes = tp_sizes(module)
        for name, dim in tp_dims(module).items():
            if name in state:  # a module may leave frozen weights out of its state (LoRA)
                state[name] = _as_global(state[name], dim, mesh, sizes.get(name))
    return state


def optimizer_state(module: torch.nn.Module, optimizer) -> dict[str, Any]:
    """FQN-keyed optimizer state; moments of tp shards wrapped as DTensors (in new dicts:
    the per-parameter dicts ``get_optimizer_state_dict`` returns are the optimizer's own,
    and the optimizer must keep its plain tensors to go on training after a save)."""
    optimizer = getattr(optimizer, "_optimizer", optimizer)  # LightningOptimizer
    state = get_optimizer_state_dict(module, optimizer, options=StateDictOptions())
    mesh = _tp_mesh()
    if mesh is not None:
        params = dict(module.named_parameters())
        sizes = tp_sizes(module)
        for name, dim in tp_dims(module).items():
            if name not in state["state"]:
                continue
            state["state"][name] = {
                key: _as_global(value, dim, mesh, sizes.get(name))
                if isinstance(value, torch.Tensor) and value.shape == params[name].shape
                else value
                for key, value in state["state"][name].items()
            }
    return state


def unwrap_tp(entries: dict[str, Any], tp_names: dict[str, int]) -> dict[str, Any]:
    """``entries`` with the tp DTensors of :func:`model_state`/:func:`optimizer_state`
    back to the local shards the module holds; other DTensors (FSDP2's) stay."""

    return {
        name: (
            {k: local_shard(v) for k, v in value.items()}
            if isinstance(value, dict)
            else local_shard(value)
        )
        if name in tp_names
        else value
        for name, value in entries.items()
    }


def local_shard(value: Any) -> Any:
    """The local shard of a DTensor or ShardedTensor; any other value as it is."""
    if isinstance(value, DTensor):
        return value.to_local()
    if isinstance(value, ShardedTensor):
        return value.local_shards()[0].tensor
    return value
