"""Full (single-device) weights of tp-sharded models: the tp contract, gathering,
loading, and the one writer of full-weight files.

The contract shared by all of vidpar: a parameter sharded over the tp group carries
``tensor_parallel_dim: int``, meaning "this parameter is the tp-rank-th equal chunk of the
full single-device tensor along that dim"; parameters without it are replicated. A shard
of uneven size (whole heads, or FFN channels, that tp does not divide: the first ranks
hold one more) also carries ``tensor_parallel_sizes``, every tp rank's size along that dim
in rank order; the rank-th shard starts after the sizes of the ranks before it.
Parameter names are those of the single-device model, so a full state dict fits any tp
size: :func:`load_full_state_dict` slices it, :func:`full_state_dict` gathers it back. A
module exposing a ``tp_group`` attribute names the group its own shards span.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from vidpar.distributed.group import GroupCoordinator
from vidpar.distributed.state import get_parallel_state
from vidpar.distributed.utils import split_sizes

__all__ = [
    "HPARAMS_KEY",
    "export_full_checkpoint",
    "full_state_dict",
    "load_full_state_dict",
    "load_full_weights",
    "mark_tensor_parallel",
    "read_hyper_parameters",
    "save_full_weights",
    "shard_groups",
    "shard_sizes",
    "tensor_parallel_shard",
    "tensor_parallel_sizes",
]

#: safetensors header entry holding the training run's hyper-parameters (JSON).
HPARAMS_KEY = "vidpar.hyper_parameters"


def mark_tensor_parallel(
    param: nn.Parameter, dim: int, sizes: tuple[int, ...] | None = None
) -> nn.Parameter:
    """Tag ``param`` as the tp-rank-th chunk of the full tensor along ``dim``: an equal one,
    or with uneven ``sizes`` (every tp rank's, from :func:`tensor_parallel_sizes`)."""
    param.tensor_parallel_dim = dim
    if sizes is not None:
        param.tensor_parallel_sizes = tuple(sizes)
    return param


def tensor_parallel_sizes(
    units: int, group: GroupCoordinator, unit: int = 1
) -> tuple[int, ...] | None:
    """Every tp rank's shard size of ``units`` whole units of ``unit`` elements each (the
    heads of ``head_dim`` channels), the first ``units % tp`` ranks holding one unit more;
    ``None`` when tp divides ``units`` (equal chunks, the plain contract)."""
    if units % group.world_size == 0:
        return None
    return tuple(n * unit for n in split_sizes(units, group.world_size))


def shard_sizes(tensor: torch.Tensor) -> tuple[int, ...] | None:
    """The uneven tp shard sizes ``tensor`` carries, or ``None`` (equal chunks, or
    replicated)."""
    return getattr(tensor, "tensor_parallel_sizes", None)


def tensor_parallel_shard(
    full: torch.Tensor,
    dim: int,
    group: GroupCoordinator,
    sizes: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """This rank's chunk of ``full`` along ``dim`` (a view): an equal one, or the rank-th of
    uneven ``sizes``."""
    n = group.world_size
    if sizes is None:
        if full.shape[dim] % n:
            raise ValueError(
                f"dimension {dim} of size {full.shape[dim]} does not split into tp({n})"
            )
        return full.chunk(n, dim)[group.rank_in_group]
    if len(sizes) != n or sum(sizes) != full.shape[dim]:
        raise ValueError(
            f"dimension {dim} of size {full.shape[dim]} does not split into tp({n}) shards "
            f"of sizes {list(sizes)}"
        )
    rank = group.rank_in_group
    return full.narrow(dim, sum(sizes[:rank]), sizes[rank])


def _gather_shards(
    tensor: torch.Tensor, dim: int, group: GroupCoordinator, sizes: tuple[int, ...] | None
) -> torch.Tensor:
    """Every rank's shard of ``tensor`` concatenated along ``dim``: one all-gather (uneven
    shards are padded to the largest for it, the padding dropped after)."""
    if sizes is None or group.world_size == 1:
        return group.all_gather(tensor, dim)
    largest = max(sizes)
    padding = list(tensor.shape)
    padding[dim] = largest - padding[dim]
    parts = group.all_gather(torch.cat([tensor, tensor.new_zeros(padding)], dim), dim)
    parts = parts.split(largest, dim)
    shards = [part.narrow(dim, 0, n) for part, n in zip(parts, sizes, strict=True)]
    return torch.cat(shards, dim)


def shard_groups(
    model: nn.Module, group: GroupCoordinator | None = None
) -> dict[int, GroupCoordinator]:
    """The tp group of every sharded parameter (or buffer), keyed by ``id``: its owning
    module's ``tp_group`` if that module has one, else ``group`` (default: the layout's)."""
    default = group or get_parallel_state().group("tp")
    groups: dict[int, GroupCoordinator] = {}
    for module in model.modules():
        owner = getattr(module, "tp_group", None)
        owner = owner if isinstance(owner, GroupCoordinator) else default
        for tensor in itertools.chain(module.parameters(False), module.buffers(False)):
            if getattr(tensor, "tensor_parallel_dim", None) is not None:
                groups[id(tensor)] = owner
    return groups


def load_full_state_dict(
    model: nn.Module,
    full_state_dict: Mapping[str, torch.Tensor],
    *,
    strict: bool = True,
    group: GroupCoordinator | None = None,
) -> tuple[list[str], list[str]]:
    """Copy a single-device state dict into ``model``: each rank takes its chunk of every
    tp-sharded parameter (``tensor_parallel_dim``) and all of every other entry.

    No communication. Returns ``(missing, unexpected)`` keys; with ``strict`` either
    raises ``KeyError``. ``group`` is the tp group for sharded parameters whose module
    does not name one (default: the layout's).
    """
    own = model.state_dict(keep_vars=True)
    missing = [k for k in own if k not in full_state_dict]
    unexpected = [k for k in full_state_dict if k not in own]
    if strict and (missing or unexpected):
        raise KeyError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    groups = shard_groups(model, group)
    with torch.no_grad():
        for name, target in own.items():
            if name not in full_state_dict:
                continue
            source = full_state_dict[name]
            dim = getattr(target, "tensor_parallel_dim", None)
            if dim is not None:
                tp, sizes = groups[id(target)], shard_sizes(target)
                expected = list(target.shape)
                expected[dim] = sum(sizes) if sizes else expected[dim] * tp.world_size
                if list(source.shape) != expected:
                    shards = f"shards of sizes {list(sizes)}" if sizes else "shards"
                    raise ValueError(
                        f"{name}: full shape {tuple(source.shape)} is not tp({tp.world_size}) "
                        f"{shards} of {tuple(target.shape)} along dim {dim}"
                    )
                source = tensor_parallel_shard(source, dim, tp, sizes)
            elif source.shape != target.shape:
                raise ValueError(
                    f"{name}: shape {tuple(source.shape)} does not match {tuple(target.shape)}"
                )
            target.copy_(source)
    return missing, unexpected


def full_state_dict(
    model: nn.Module, *, group: GroupCoordinator | None = None
) -> dict[str, torch.Tensor]:
    """The single-device state dict of ``model``: tp-sharded entries are all-gathered over
    their tp group, the rest copied. Every rank of the tp group must call it."""
    groups = shard_groups(model, group)
    out = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        dim = getattr(tensor, "tensor_parallel_dim", None)
        if dim is None:
            out[name] = tensor.detach().clone()
        else:
            tp = groups[id(tensor)]
            gathered = _gather_shards(tensor.detach().contiguous(), dim, tp, shard_sizes(tensor))
            out[name] = gathered.clone() if tp.world_size == 1 else gathered
    return out


def load_full_weights(
    model: nn.Module,
    source: str | os.PathLike | Mapping[str, torch.Tensor],
    *,
    strict: bool = True,
    group: GroupCoordinator | None = None,
) -> tuple[list[str], list[str]]:
    """:func:`load_full_state_dict` from a state dict or a ``.safetensors`` file path."""
    if isinstance(source, str | os.PathLike):
        from safetensors.torch import load_file

        source = load_file(os.fspath(source))
    return load_full_state_dict(model, source, strict=strict, group=group)


def save_full_weights(
    source: nn.Module | Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    *,
    metadata: Mapping[str, str] | None = None,
    group: GroupCoordinator | None = None,
) -> Path:
    """Write full weights as one ``.safetensors`` file (``metadata`` in its header), the
    only writer of full weights in vidpar. A module is gathered first
    (:func:`full_state_dict`: every rank of its tp group calls this) and global rank 0
    writes; the file appears atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    state = full_state_dict(source, group=group) if isinstance(source, nn.Module) else source
    if dist.is_initialized() and dist.get_rank() != 0:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        save_file(tensors, str(partial), metadata=dict(metadata or {}))
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def export_full_checkpoint(
    ckpt_dir: str | os.PathLike,
    out: str | os.PathLike,
    prefix: str | None = None,
    metadata: Mapping[str, str] | None = None,
    trust: bool = False,
) -> Path:
    """Write the network weights of a sharded vidpar checkpoint as one safetensors file.

    Runs in one process, no distributed setup needed. Keys starting with ``prefix`` (the
    LightningModule attribute holding the network; default ``"ema_model."`` when the
    checkpoint has an EMA copy, else ``"model."``) are kept with the prefix removed, so a
    single-device model loads the file with ``load_state_dict``. The checkpoint's
    hyper-parameters go into the header (``vidpar.hyper_parameters``, JSON), so
    :meth:`vidpar.pipelines.VideoGenerator.from_checkpoint` can rebuild the model from
    the file alone; ``metadata`` adds more entries. The checkpoint's files are checked
    against the manifest of its save first (a damaged one raises
    :class:`~vidpar.distributed.checkpoint_integrity.CorruptCheckpointError` naming it),
    and its manifest must be signed with this user's key unless ``trust`` (else
    :class:`~vidpar.distributed.checkpoint_signing.UntrustedCheckpointError`): nothing is
    unpickled before.
    """
    from vidpar.distributed.checkpoint_integrity import verify
    from vidpar.distributed.checkpoint_state import load_trainer_state
    from vidpar.distributed.checkpoint_store import TRAINER_STATE, resolve

    resolved = resolve(ckpt_dir)
    if resolved is None:
        raise FileNotFoundError(f"{ckpt_dir} is not a complete vidpar checkpoint")
    ckpt_dir = resolved
    verify(ckpt_dir, trust=trust)
    full = _read_dcp_model(ckpt_dir)
    if prefix is None:
        prefix = "ema_model." if any(k.startswith("ema_model.") for k in full) else "model."
    weights = {
        k.removeprefix(prefix): v
        for k, v in full.items()
        if isinstance(v, torch.Tensor) and k.startswith(prefix)
    }
    if not weights:
        raise ValueError(
            f"no weights under prefix {prefix!r} in {ckpt_dir}; keys: {sorted(full)[:5]}"
        )
    hparams = load_trainer_state(ckpt_dir / TRAINER_STATE).get("hyper_parameters")
    header = {HPARAMS_KEY: json.dumps(dict(hparams or {}), default=str)}
    return save_full_weights(weights, out, metadata={**header, **(metadata or {})})


def _read_dcp_model(ckpt_dir: Path) -> dict[str, Any]:
    """The ``model`` entries of a DCP checkpoint, read in this process (full tensors), as
    DCP's own ``dcp_to_torch_save`` reads them, without the file in between."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    state: dict[str, Any] = {}
    _load_state_dict(
        state,
        storage_reader=FileSystemReader(str(ckpt_dir)),
        planner=_EmptyStateDictLoadPlanner(keys={"model"}),
        no_dist=True,
    )
    return state.get("model", {})


def read_hyper_parameters(path: str | os.PathLike) -> dict[str, Any] | None:
    """The hyper-parameters :func:`export_full_checkpoint` stored in a safetensors file's
    header, or ``None`` when it has none."""
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt") as f:
        metadata = f.metadata() or {}
    return json.loads(metadata[HPARAMS_KEY]) if HPARAMS_KEY in metadata else None
