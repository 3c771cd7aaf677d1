"""Sharded checkpoints with ``torch.distributed.checkpoint`` (DCP): save, check, load.

A checkpoint is a directory: DCP's files for the model and optimizer states,
``trainer_state.pt`` with the rest of the training state (for Lightning: loops, callbacks,
epoch; plain values and tensors only, :mod:`~vidpar.distributed.checkpoint_state`) and a
manifest of every file's size and checksums, signed with the user's key
(:mod:`~vidpar.distributed.checkpoint_integrity`). Tensor-parallel shards (parameters
carrying ``tensor_parallel_dim``) are saved as pieces of the full tensors
(:mod:`~vidpar.distributed.checkpoint_tp`), so a checkpoint loads into any tp/sp layout, a
single process included. A save
never touches the previous checkpoint: it writes a new version beside it and switches a
pointer atomically (:mod:`~vidpar.distributed.checkpoint_store`), and it refuses to run
when a weight is not finite, so a diverged model never replaces a good checkpoint. A load
checks the signature, sizes and checksums first (before DCP unpickles anything) and names
any damaged file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

from vidpar.distributed import checkpoint_integrity as integrity
from vidpar.distributed import checkpoint_store as store
from vidpar.distributed import state as ps
from vidpar.distributed.checkpoint_integrity import CorruptCheckpointError
from vidpar.distributed.checkpoint_signing import UntrustedCheckpointError
from vidpar.distributed.checkpoint_state import load_trainer_state, save_trainer_state
from vidpar.distributed.checkpoint_store import DCP_METADATA, TRAINER_STATE, is_complete
from vidpar.distributed.checkpoint_tp import (
    local_shard,
    model_state,
    optimizer_state,
    tp_dims,
    tp_sizes,
    unwrap_tp,
)
from vidpar.distributed.group import GroupCoordinator

__all__ = [
    "TRAINER_STATE",
    "CheckpointWriteError",
    "CorruptCheckpointError",
    "NonFiniteWeightsError",
    "UntrustedCheckpointError",
    "check_fits",
    "is_complete",
    "load_sharded",
    "remove",
    "save_sharded",
]


class NonFiniteWeightsError(ValueError):
    """A save was refused: some weights are NaN or infinite."""


class CheckpointWriteError(OSError):
    """A save failed on a file operation (a full disk, a quota, permissions); the previous
    checkpoint (``kept``, if any) is untouched."""

    def __init__(self, path: Path, reason: str, kept: Path | None) -> None:
        self.path, self.reason, self.kept = path, reason, kept
        previous = (
            f"the previous checkpoint {kept} is kept: free space in {path.parent} (or point "
            f"checkpoint.dirpath elsewhere) and resume with ckpt_path={path}"
            if kept
            else f"there is no earlier checkpoint: free space in {path.parent} (or point "
            "checkpoint.dirpath elsewhere) and run again"
        )
        super().__init__(
            f"could not write the checkpoint {path} ({reason}; a full disk or quota?); nothing "
            f"of this save was kept, {previous}."
        )

    def __reduce__(self):
        return (type(self), (self.path, self.reason, self.kept))


def save_sharded(
    path: Path,
    module: torch.nn.Module,
    optimizers: list,
    trainer_state: dict[str, Any],
    keep_last: int = 1,
) -> None:
    """Write a sharded checkpoint of ``module`` and ``optimizers`` as the new version of
    ``path`` (keeping ``keep_last`` versions); every rank of the world calls it.

    Raises :class:`NonFiniteWeightsError` on every rank, before writing anything, when a
    weight of ``module`` is not finite on any rank."""
    world = ps.get_world_group()
    state = {"model": model_state(module)}
    _refuse_non_finite(state["model"], path, world)
    for i, optimizer in enumerate(optimizers):
        state[f"optimizer_{i}"] = optimizer_state(module, optimizer)
    kept = store.resolve(path)
    staging = Path(_on_first_rank(lambda: str(store.prepare(path)), world))
    try:
        metadata = dcp.save(state, checkpoint_id=staging, process_group=world.cpu_group)
        mine = _written_by(world.rank_in_group, world.world_size, _written_files(metadata, staging))
        described = _all_gather(_outcome(lambda: integrity.describe(staging, mine)), world)
        _raise_first(described)

        def finish() -> None:
            save_trainer_state(trainer_state, staging / TRAINER_STATE)
            store.fsync_file(staging / TRAINER_STATE)
            table = integrity.describe(staging, [DCP_METADATA, TRAINER_STATE])
            for entries in described:
                table |= entries
            integrity.write_manifest(staging, table)
            store.commit(path, staging, keep_last)

        _on_first_rank(finish, world)
    except BaseException as err:
        if world.is_first_rank:
            store.discard(staging)
        reason = _write_failure(err)
        if reason is not None:
            raise CheckpointWriteError(path, reason, kept) from err
        raise


def _write_failure(err: BaseException | None) -> str | None:
    """Why writing a checkpoint's files failed, in one line, when ``err`` (or its cause) is
    an ``OSError`` or DCP's ``CheckpointException`` (whose ranks' errors include torch's
    ``RuntimeError`` for a failed file write: a full disk shows as "unexpected pos")."""
    for _ in range(8):
        if err is None:
            return None
        if isinstance(err, OSError):
            return str(err)
        failures = getattr(err, "failures", None)
        if isinstance(failures, dict) and failures:
            rank, failure = next(iter(failures.items()))
            first = failure[0] if isinstance(failure, tuple) else failure
            first_line = (str(first).strip().splitlines() or [""])[0]
            line = _write_failure(first) or f"{type(first).__name__}: {first_line}"
            return f"rank {rank}: {line}"
        err = err.__cause__ or err.__context__
    return None


def _written_files(metadata: Any, staging: Path) -> set[str]:
    """The data files ``dcp.save`` wrote; torch 2.11 returns its metadata without them, so
    they are then read back from the metadata file the save wrote."""
    storage = metadata.storage_data or dcp.FileSystemReader(staging).read_metadata().storage_data
    return {info.relative_path for info in storage.values()}


def _outcome(fn) -> Any:
    """``fn()``, or the exception it raised (to be sent to the other ranks)."""
    try:
        return fn()
    except Exception as err:  # re-raised on every rank by _raise_first
        return err


def _raise_first(results: list[Any]) -> None:
    for result in results:
        if isinstance(result, Exception):
            raise result


def _on_first_rank(fn, world: GroupCoordinator) -> Any:
    """``fn()`` on the world's first rank, its result (or its exception, raised) on all."""
    result = world.broadcast_object(_outcome(fn) if world.is_first_rank else None)
    _raise_first([result])
    return result


def _written_by(rank: int, world_size: int, files: set[str]) -> list[str]:
    """The files a rank checksums: those DCP named after it (``__<rank>_*``, so read from
    its own page cache); rank 0 also takes any other."""
    owners = {name: r for name in files for r in range(world_size) if name.startswith(f"__{r}_")}
    return sorted(name for name in files if owners.get(name, 0) == rank)


def _all_gather(obj: Any, world: GroupCoordinator) -> list[Any]:
    if world.world_size == 1:
        return [obj]
    out: list[Any] = [None] * world.world_size
    dist.all_gather_object(out, obj, group=world.cpu_group)
    return out


def _refuse_non_finite(model_state: dict[str, Any], path: Path, world: GroupCoordinator) -> None:
    """Every rank raises the same :class:`NonFiniteWeightsError` when any rank holds a
    non-finite floating-point weight."""
    tensors = {
        name: local
        for name, value in model_state.items()
        if isinstance(local := local_shard(value), torch.Tensor) and local.is_floating_point()
    }
    finite = (
        torch.stack([torch.isfinite(t).all() for t in tensors.values()]).tolist() if tensors else []
    )
    bad = [name for name, ok in zip(tensors, finite, strict=True) if not ok]
    reports = _all_gather((world.rank, bad), world)
    ranks = [rank for rank, names in reports if names]
    if not ranks:
        return
    names = next(names for _, names in reports if names)
    raise NonFiniteWeightsError(
        f"Refusing to save the checkpoint {path}: weights are NaN or infinite on rank(s) "
        f"{ranks} ({_first(names, ', ')}; {len(names)} tensors on rank {ranks[0]}). The "
        "training diverged; no checkpoint was written, the previous one is untouched. "
        "Resume from it with a lower learning rate, or stop at the first bad step with "
        "on_nonfinite=raise."
    )


def load_sharded(
    path: Path, module: torch.nn.Module, optimizers: list, trust: bool = False
) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_sharded` into ``module`` and ``optimizers``
    (in place, resharding to this layout); returns the rest of the trainer state.

    The manifest's signature and every file's size and checksums are checked first (the
    reading shared between ranks): a damaged file raises :class:`CorruptCheckpointError`
    naming it, a checkpoint not signed with this user's key (unless ``trust``)
    :class:`UntrustedCheckpointError`, on every rank, before anything is unpickled."""
    resolved = store.resolve(path)
    if resolved is None:
        raise FileNotFoundError(
            f"{path} is not a complete vidpar checkpoint (missing {TRAINER_STATE} or DCP "
            "metadata): it does not exist, or its save was interrupted. Pick another "
            "checkpoint, or start without ckpt_path."
        )
    path = resolved
    world = ps.get_world_group()
    _verify_shared(path, world, trust)
    check_fits(path, module)
    state: dict[str, Any] = {"model": model_state(module)}
    optimizers = [getattr(o, "_optimizer", o) for o in optimizers]
    for i, optimizer in enumerate(optimizers):
        state[f"optimizer_{i}"] = optimizer_state(module, optimizer)
    dcp.load(state, checkpoint_id=path, process_group=world.cpu_group)
    tp_names = tp_dims(module)
    module.load_state_dict(unwrap_tp(state["model"], tp_names))
    for i, optimizer in enumerate(optimizers):
        saved = state[f"optimizer_{i}"]
        saved = {**saved, "state": unwrap_tp(saved["state"], tp_names)}
        set_optimizer_state_dict(module, optimizer, optim_state_dict=saved)
    return load_trainer_state(path / TRAINER_STATE)


def _verify_shared(path: Path, world: GroupCoordinator, trust: bool) -> None:
    """:func:`~vidpar.distributed.checkpoint_integrity.verify` with the checksums split
    between the world's ranks; every rank raises the same error."""
    share = (world.rank_in_group, world.world_size)
    try:
        damaged = integrity.find_damage(path, share=share, trust=trust)
    except CorruptCheckpointError as err:
        damaged = err.damaged
    except UntrustedCheckpointError as err:
        damaged = err
    reports = _all_gather(damaged, world)
    _raise_first(reports)
    if any(report is None for report in reports):
        if world.is_first_rank:
            integrity.warn_unverified(path)
        return
    everything = sorted({line for report in reports for line in report})
    if everything:
        raise CorruptCheckpointError(path, everything)


def check_fits(path: Path, module: torch.nn.Module) -> None:
    """Raise a ``ValueError`` that names the differences when the checkpoint at ``path``
    lacks some of ``module``'s weights or holds them in other (full, unsharded) shapes.
    It reads DCP's metadata (a pickle): call it on a verified checkpoint only, as
    :func:`load_sharded` does."""
    saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    tp = ps.get_parallel_config().tp
    dims, uneven = tp_dims(module), tp_sizes(module)
    missing, reshaped = [], []
    for name, tensor in module.state_dict().items():
        entry = saved.get(f"model.{name}")
        shape = list(tensor.shape)
        if name in uneven:
            shape[dims[name]] = sum(uneven[name])
        elif name in dims:
            shape[dims[name]] *= tp
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
    """Delete a checkpoint: every version, then its name (see
    :func:`~vidpar.distributed.checkpoint_store.remove`)."""
    store.remove(path)
