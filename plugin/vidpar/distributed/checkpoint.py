"""Sharded checkpoints with ``torch.distributed.checkpoint`` (DCP), and their export.

A checkpoint is a directory: DCP's files for the model and optimizer states, plus
``trainer_state.pt`` with the rest of the training state (for Lightning: loops, callbacks,
epoch).
Tensor-parallel shards (parameters carrying ``tensor_parallel_dim``) are saved as DTensors
over the tp mesh dimension, so a checkpoint loads into any tp/sp layout, a single process
included. A save is written to a temporary sibling and renamed into place only after
every rank finished, so an interrupted save never looks complete.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor, Shard

from vidpar.distributed import state as ps

TRAINER_STATE = "trainer_state.pt"
_DCP_METADATA = ".metadata"


def is_complete(path: Path) -> bool:
    """Whether ``path`` holds a finished vidpar checkpoint."""
    return (path / TRAINER_STATE).is_file() and (path / _DCP_METADATA).is_file()


def _tp_dims(module: torch.nn.Module) -> dict[str, int]:
    return {
        name: param.tensor_parallel_dim
        for name, param in module.named_parameters()
        if getattr(param, "tensor_parallel_dim", None) is not None
    }


def _tp_mesh():
    state = ps.get_parallel_state()
    return state.mesh["tp"] if state.config.tp > 1 else None


def _as_dtensor(tensor: torch.Tensor, dim: int, mesh) -> DTensor:
    shape = list(tensor.shape)
    shape[dim] *= mesh.size()
    return DTensor.from_local(
        tensor,
        mesh,
        [Shard(dim)],
        run_check=False,
        shape=torch.Size(shape),
        stride=torch.empty(shape, device="meta").stride(),
    )


def _model_state(module: torch.nn.Module) -> dict[str, Any]:
    """The module's state, tp shards wrapped as DTensors (sharing the parameters' storage)."""
    state = module.state_dict()
    mesh = _tp_mesh()
    if mesh is not None:
        for name, dim in _tp_dims(module).items():
            state[name] = _as_dtensor(state[name], dim, mesh)
    return state


def _optimizer_state(module: torch.nn.Module, optimizer) -> dict[str, Any]:
    """FQN-keyed optimizer state; moments of tp shards wrapped as DTensors (in new dicts:
    the per-parameter dicts ``get_optimizer_state_dict`` returns are the optimizer's own,
    and the optimizer must keep its plain tensors to go on training after a save)."""
    optimizer = getattr(optimizer, "_optimizer", optimizer)  # LightningOptimizer
    state = get_optimizer_state_dict(module, optimizer, options=StateDictOptions())
    mesh = _tp_mesh()
    if mesh is not None:
        params = dict(module.named_parameters())
        for name, dim in _tp_dims(module).items():
            if name not in state["state"]:
                continue
            state["state"][name] = {
                key: _as_dtensor(value, dim, mesh)
                if isinstance(value, torch.Tensor) and value.shape == params[name].shape
                else value
                for key, value in state["state"][name].items()
            }
    return state


def _local(tree: Any) -> Any:
    if isinstance(tree, DTensor):
        return tree.to_local()
    if isinstance(tree, dict):
        return {k: _local(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_local(v) for v in tree]
    return tree


def save_sharded(
    path: Path, module: torch.nn.Module, optimizers: list, trainer_state: dict[str, Any]
) -> None:
    """Write a sharded checkpoint of ``module`` and ``optimizers`` to the directory ``path``."""
    world = ps.get_world_group()
    staging = Path(world.broadcast_object(_staging_dir(path) if world.is_first_rank else None))
    state = {"model": _model_state(module)}
    for i, optimizer in enumerate(optimizers):
        state[f"optimizer_{i}"] = _optimizer_state(module, optimizer)
    dcp.save(state, checkpoint_id=staging, process_group=world.cpu_group)
    world.barrier()
    if world.is_first_rank:
        torch.save(trainer_state, staging / TRAINER_STATE)
        if path.exists():
            remove(path)
        staging.rename(path)
    world.barrier()


def _staging_dir(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    return tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent)


def load_sharded(path: Path, module: torch.nn.Module, optimizers: list) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_sharded` into ``module`` and ``optimizers``
    (in place, resharding to this layout); returns the rest of the trainer state."""
    if not is_complete(path):
        raise FileNotFoundError(
            f"{path} is not a complete vidpar checkpoint (missing {TRAINER_STATE} or DCP "
            "metadata): it does not exist, or its save was interrupted. Pick another "
            "checkpoint, or start without ckpt_path."
        )
    check_fits(path, module)
    world = ps.get_world_group()
    state: dict[str, Any] = {"model": _model_state(module)}
    optimizers = [getattr(o, "_optimizer", o) for o in optimizers]
    for i, optimizer in enumerate(optimizers):
        state[f"optimizer_{i}"] = _optimizer_state(module, optimizer)
    dcp.load(state, checkpoint_id=path, process_group=world.cpu_group)
    module.load_state_dict(_local(state["model"]))
    for i, optimizer in enumerate(optimizers):
        set_optimizer_state_dict(
            module, optimizer, optim_state_dict=_local(state[f"optimizer_{i}"])
        )
    return torch.load(path / TRAINER_STATE, weights_only=False)


def check_fits(path: Path, module: torch.nn.Module) -> None:
    """Raise a ``ValueError`` that names the differences when the checkpoint at ``path``
    lacks some of ``module``'s weights or holds them in other (full, unsharded) shapes."""
    saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    tp = ps.get_parallel_config().tp
    tp_dims = _tp_dims(module)
    missing, reshaped = [], []
    for name, tensor in module.state_dict().items():
        entry = saved.get(f"model.{name}")
        shape = list(tensor.shape)
        if name in tp_dims:
            shape[tp_dims[name]] *= tp
        if entry is None:
            missing.append(name)
        elif list(getattr(entry, "size", shape)) != shape:
            reshaped.append(f"{name} (checkpoint {list(entry.size)}, model {shape})")
    if not missing and not reshaped:
        return
    found = []
    if missing:
        found.append(f"{len(missing)} weights are not in it ({_first(missing, ', ')})")
    if reshaped:
        found.append(f"{len(reshaped)} have other shapes ({_first(reshaped, '; ')})")
    raise ValueError(
        f"The checkpoint {path} was written by a different model: {' and '.join(found)}. "
        f"Resume with the model settings it was trained with (its {TRAINER_STATE} holds "
        "them under hyper_parameters), or start without a checkpoint."
    )


def _first(items: list[str], sep: str, count: int = 3) -> str:
    return sep.join(items[:count]) + (f"{sep}..." if len(items) > count else "")


def remove(path: Path) -> None:
    """Delete a checkpoint directory (or a stray file at that path)."""
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
