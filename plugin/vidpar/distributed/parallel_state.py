"""The process groups of one parallel layout and the collectives each group offers.

Call :func:`init_distributed_environment` once per process, then
:func:`initialize_model_parallel` with a :class:`~vidpar.config.ParallelConfig`; the getters
(:func:`get_tp_group`, :func:`get_sp_group`, ...) then give each group's
:class:`GroupCoordinator`. :func:`parallel_context` does all of it and tears it down.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup, ReduceOp

from vidpar.config import GROUP_DIMS, ParallelConfig
from vidpar.distributed import telemetry
from vidpar.distributed.device_communicators import DeviceCommunicator, create_communicator

logger = logging.getLogger(__name__)


class GroupCoordinator:
    """One process group of the layout, as seen from this process.

    Holds the group's ``ranks``, this process's ``rank_in_group``, a gloo ``cpu_group``
    for objects and control, a ``device_group`` for tensors and the ``communicator`` that
    moves them. Sources and destinations are ranks in the group. A group of one rank
    communicates nothing and returns at once. Every tensor collective is timed into the
    active :mod:`~vidpar.distributed.telemetry` recorder, if any.
    """

    def __init__(
        self,
        name: str,
        ranks: list[int],
        cpu_group: ProcessGroup | None,
        device_group: ProcessGroup | None,
        device: torch.device,
        communicator: str = "auto",
    ) -> None:
        self.name = name
        self.ranks = list(ranks)
        self.rank = dist.get_rank() if dist.is_initialized() else self.ranks[0]
        self.rank_in_group = self.ranks.index(self.rank)
        self.world_size = len(self.ranks)
        self.cpu_group = cpu_group
        self.device_group = device_group
        self.device = device
        self.communicator: DeviceCommunicator | None = None
        if self.world_size > 1:
            self.communicator = create_communicator(
                communicator, cpu_group, device_group, self.ranks, self.rank_in_group, device
            )

    def __repr__(self) -> str:
        return (
            f"GroupCoordinator({self.name}, ranks={self.ranks}, rank_in_group={self.rank_in_group})"
        )

    @property
    def is_first_rank(self) -> bool:
        return self.rank_in_group == 0

    @property
    def next_rank(self) -> int:
        """Rank in group of the next member, wrapping around (the ring's send direction)."""
        return (self.rank_in_group + 1) % self.world_size

    @property
    def prev_rank(self) -> int:
        """Rank in group of the previous member, wrapping around."""
        return (self.rank_in_group - 1) % self.world_size

    def _measure(self, op: str, tensor: torch.Tensor, nbytes: int | None = None):
        return telemetry.measure(op, self.name, tensor, self.world_size, nbytes)

    # Tensor collectives -------------------------------------------------------------

    def all_reduce(
        self, tensor: torch.Tensor, op: ReduceOp.RedOpType = ReduceOp.SUM
    ) -> torch.Tensor:
        """Sum (or ``op``) over the group, in place; returns ``tensor``."""
        if self.world_size == 1:
            return tensor
        with self._measure("all_reduce", tensor):
            return self.communicator.all_reduce(tensor, op)

    def all_gather(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Every rank's ``tensor`` concatenated along ``dim`` in rank order."""
        if self.world_size == 1:
            return tensor
        nbytes = tensor.numel() * tensor.element_size() * self.world_size
        with self._measure("all_gather", tensor, nbytes):
            return self.communicator.all_gather(tensor, dim)

    def gather(self, tensor: torch.Tensor, dst: int = 0, dim: int = 0) -> torch.Tensor | None:
        """Concatenation along ``dim`` on rank ``dst``; ``None`` on the others."""
        if self.world_size == 1:
            return tensor
        nbytes = tensor.numel() * tensor.element_size() * self.world_size
        with self._measure("gather", tensor, nbytes):
            return self.communicator.gather(tensor, dst, dim)

    def reduce_scatter(
        self, tensor: torch.Tensor, dim: int = 0, op: ReduceOp.RedOpType = ReduceOp.SUM
    ) -> torch.Tensor:
        """Reduce over the group and keep this rank's equal chunk along ``dim``."""
        if self.world_size == 1:
            return tensor
        with self._measure("reduce_scatter", tensor):
            return self.communicator.reduce_scatter(tensor, dim, op)

    def all_to_all(self, tensor: torch.Tensor, scatter_dim: int, gather_dim: int) -> torch.Tensor:
        """Send chunk ``i`` along ``scatter_dim`` to rank ``i``; concatenate what arrives
        along ``gather_dim`` (the Ulysses exchange)."""
        if self.world_size == 1:
            return tensor
        with self._measure("all_to_all", tensor):
            return self.communicator.all_to_all(tensor, scatter_dim, gather_dim)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Rank ``src``'s ``tensor`` copied into every rank's ``tensor`` (in place)."""
        if self.world_size == 1:
            return tensor
        with self._measure("broadcast", tensor):
            return self.communicator.broadcast(tensor, src)

    def send(self, tensor: torch.Tensor, dst: int | None = None) -> None:
        """Send to rank ``dst`` of the group (default: the next rank)."""
        dst = self.next_rank if dst is None else dst
        with self._measure("send", tensor):
            self.communicator.send(tensor, dst)

    def recv(
        self, shape: torch.Size | tuple[int, ...], dtype: torch.dtype, src: int | None = None
    ) -> torch.Tensor:
        """Receive a tensor of ``shape`` and ``dtype`` from rank ``src`` (default: previous)."""
        src = self.prev_rank if src is None else src
        tensor = torch.empty(shape, dtype=dtype, device=self.device)
        with self._measure("recv", tensor):
            return self.communicator.recv(tensor, src)

    # Objects and control ------------------------------------------------------------

    def broadcast_object(self, obj: Any = None, src: int = 0) -> Any:
        """Rank ``src``'s picklable ``obj`` on every rank."""
        if self.world_size == 1:
            return obj
        box = [obj if self.rank_in_group == src else None]
        dist.broadcast_object_list(box, group=self.cpu_group, group_src=src)
        return box[0]

    def broadcast_tensor_dict(
        self, tensor_dict: dict[str, Any] | None = None, src: int = 0
    ) -> dict[str, Any]:
        """Rank ``src``'s dict on every rank: metadata over the cpu group, tensors over the
        device group (one broadcast each), other values pickled with the metadata."""
        if self.world_size == 1:
            return tensor_dict
        is_src = self.rank_in_group == src
        meta = None
        if is_src:
            meta = {
                k: ("tensor", v.shape, v.dtype) if isinstance(v, torch.Tensor) else ("value", v)
                for k, v in tensor_dict.items()
            }
        meta = self.broadcast_object(meta, src)
        out = {}
        for key, entry in meta.items():
            if entry[0] == "value":
                out[key] = entry[1]
                continue
            tensor = (
                tensor_dict[key].to(self.device).contiguous()
                if is_src
                else torch.empty(entry[1], dtype=entry[2], device=self.device)
            )
            out[key] = self.broadcast(tensor, src)
        return out

    def send_object(self, obj: Any, dst: int | None = None) -> None:
        """Send a picklable ``obj`` to rank ``dst`` of the group (default: the next rank)."""
        dst = self.next_rank if dst is None else dst
        dist.send_object_list([obj], group=self.cpu_group, group_dst=dst)

    def recv_object(self, src: int | None = None) -> Any:
        """Receive an object from rank ``src`` of the group (default: the previous rank)."""
        src = self.prev_rank if src is None else src
        box = [None]
        dist.recv_object_list(box, group=self.cpu_group, group_src=src)
        return box[0]

    def barrier(self) -> None:
        """Wait until every rank of the group arrives."""
        if self.world_size > 1:
            dist.barrier(group=self.cpu_group)


# World setup -----------------------------------------------------------------------

_WORLD: GroupCoordinator | None = None
_GROUPS: dict[str, GroupCoordinator] = {}
_CONFIG: ParallelConfig | None = None
_DEVICE_MESH = None
_OWNED_PROCESS_GROUP = False
_CREATED: list[ProcessGroup] = []


def _default_device(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init_distributed_environment(
    world_size: int | None = None,
    rank: int | None = None,
    local_rank: int | None = None,
    init_method: str | None = None,
    backend: str | None = None,
    timeout: timedelta | None = None,
) -> None:
    """Join the torch.distributed world (from arguments or the ``RANK``/``WORLD_SIZE``
    environment) unless already joined, and make the world group.

    The backend defaults to NCCL on CUDA and gloo otherwise.
    """
    global _WORLD, _OWNED_PROCESS_GROUP
    local_rank = int(os.environ.get("LOCAL_RANK", 0)) if local_rank is None else local_rank
    device = _default_device(local_rank)
    if not dist.is_initialized():
        world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
        rank = int(os.environ.get("RANK", 0)) if rank is None else rank
        if init_method is None and "MASTER_ADDR" not in os.environ:
            raise RuntimeError(
                "no rendezvous address: pass init_method='tcp://host:port' or set "
                "MASTER_ADDR and MASTER_PORT (torchrun does this for you)"
            )
        backend = backend or ("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(
            backend,
            init_method=init_method or "env://",
            world_size=world_size,
            rank=rank,
            timeout=timeout,
            device_id=device if backend == "nccl" else None,
        )
        _OWNED_PROCESS_GROUP = True
    if _WORLD is None:
        ranks = list(range(dist.get_world_size()))
        cpu_group, device_group = _world_groups()
        _WORLD = GroupCoordinator("world", ranks, cpu_group, device_group, device)


def _make_coordinator(
    name: str,
    ranks: list[int],
    device: torch.device,
    communicator: str,
    groups: dict[tuple[int, ...], tuple[ProcessGroup, ProcessGroup]],
) -> GroupCoordinator:
    """Coordinator for ``ranks``, using the torch groups already created for that rank set."""
    cpu_group, device_group = groups.get(tuple(ranks), (None, None))
    return GroupCoordinator(name, ranks, cpu_group, device_group, device, communicator)


def _world_groups() -> tuple[ProcessGroup, ProcessGroup]:
    world = dist.group.WORLD
    if dist.get_backend() == "gloo":
        return world, world
    # Lives as long as the world; destroy_process_group() at exit removes it.
    return dist.new_group(list(range(dist.get_world_size())), backend="gloo"), world


def _new_group(ranks: list[int], backend: str | None) -> ProcessGroup:
    group = dist.new_group(ranks, backend=backend)
    _CREATED.append(group)
    return group


def _create_groups(
    config: ParallelConfig, world: tuple[ProcessGroup, ProcessGroup]
) -> dict[tuple[int, ...], tuple[ProcessGroup, ProcessGroup]]:
    """Torch groups for every rank set of the layout, each created once.

    ``new_group`` is collective over the whole world, so every process walks the same
    rank sets in the same order; identical rank sets (sp and ulysses when ring is 1) share
    their groups. Sets of one rank need none, and the world reuses the default group.
    """
    world_ranks = tuple(range(config.world_size))
    groups = {world_ranks: world}
    gloo_devices = dist.get_backend() == "gloo"
    for name in GROUP_DIMS:
        for ranks in config.group_ranks(name):
            key = tuple(ranks)
            if len(ranks) == 1 or key in groups:
                continue
            device_group = _new_group(ranks, None)
            cpu_group = device_group if gloo_devices else _new_group(ranks, "gloo")
            groups[key] = (cpu_group, device_group)
    return groups


def initialize_model_parallel(config: ParallelConfig, communicator: str = "auto") -> ParallelConfig:
    """Build every group of ``config`` (checked against the real world size).

    Every process of the world must call this with the same config. Returns the config
    with dp resolved against the world size.
    """
    global _CONFIG
    if _WORLD is None:
        raise RuntimeError("call init_distributed_environment() before initialize_model_parallel()")
    if _CONFIG is not None:
        raise RuntimeError("model parallel groups are already initialised; destroy them first")
    config = config.with_world_size(dist.get_world_size())
    rank = dist.get_rank()
    device = _WORLD.device
    groups = _create_groups(config, (_WORLD.cpu_group, _WORLD.device_group))
    for name in GROUP_DIMS:
        if name != "world":
            ranks = config.group_of(name, rank)
            _GROUPS[name] = _make_coordinator(name, ranks, device, communicator, groups)
    _CONFIG = config
    logger.info(
        "vidpar layout %s; rank %d at %s", config.describe(), rank, config.coordinates(rank)
    )
    return config


def model_parallel_is_initialized() -> bool:
    """Whether :func:`initialize_model_parallel` has run (and not been destroyed)."""
    return _CONFIG is not None


def destroy_model_parallel() -> None:
    """Forget the layout's groups and destroy the torch groups vidpar created."""
    global _CONFIG, _DEVICE_MESH
    for group in _CREATED:
        with contextlib.suppress(Exception):
            dist.destroy_process_group(group)
    _CREATED.clear()
    _GROUPS.clear()
    _CONFIG = None
    _DEVICE_MESH = None


def destroy_distributed_environment() -> None:
    """Leave the torch.distributed world if :func:`init_distributed_environment` joined it."""
    global _WORLD, _OWNED_PROCESS_GROUP
    destroy_model_parallel()
    _WORLD = None
    if _OWNED_PROCESS_GROUP and dist.is_initialized():
        dist.destroy_process_group()
    _OWNED_PROCESS_GROUP = False


@contextlib.contextmanager
def parallel_context(
    config: ParallelConfig, communicator: str = "auto", **init_kwargs: Any
) -> Iterator[ParallelConfig]:
    """Join the world, build the layout's groups, and tear both down on exit."""
    init_distributed_environment(**init_kwargs)
    try:
        yield initialize_model_parallel(config, communicator)
    finally:
        destroy_distributed_environment()


# Getters --------------------------------------------------------------------------


def _group(name: str) -> GroupCoordinator:
    if name == "world":
        if _WORLD is None:
            raise RuntimeError(
                "the world group is not initialised: call init_distributed_environment()"
            )
        return _WORLD
    try:
        return _GROUPS[name]
    except KeyError:
        raise RuntimeError(
            f"the {name} group is not initialised: call initialize_model_parallel(config) "
            "or use vidpar.distributed.parallel_context(config)"
        ) from None


def get_world_group() -> GroupCoordinator:
    return _group("world")


def get_tp_group() -> GroupCoordinator:
    return _group("tp")


def get_sp_group() -> GroupCoordinator:
    return _group("sp")


def get_ulysses_group() -> GroupCoordinator:
    return _group("ulysses")


def get_ring_group() -> GroupCoordinator:
    return _group("ring")


def get_cfg_group() -> GroupCoordinator:
    return _group("cfg")


def get_dp_group() -> GroupCoordinator:
    return _group("dp")


def get_dp_sp_group() -> GroupCoordinator:
    """The ranks holding replicas of one tp shard (gradients are averaged over them)."""
    return _group("dp_sp")


def get_parallel_config() -> ParallelConfig:
    if _CONFIG is None:
        raise RuntimeError(
            "no parallel layout is initialised: call initialize_model_parallel(config)"
        )
    return _CONFIG


def get_world_rank() -> int:
    return get_world_group().rank_in_group


def get_world_size() -> int:
    return get_world_group().world_size


def get_tp_rank() -> int:
    return get_tp_group().rank_in_group


def get_tp_world_size() -> int:
    return get_tp_group().world_size


def get_sp_rank() -> int:
    return get_sp_group().rank_in_group


def get_sp_world_size() -> int:
    return get_sp_group().world_size


def get_ulysses_rank() -> int:
    return get_ulysses_group().rank_in_group


def get_ulysses_world_size() -> int:
    return get_ulysses_group().world_size


def get_ring_rank() -> int:
    return get_ring_group().rank_in_group


def get_ring_world_size() -> int:
    return get_ring_group().world_size


def get_cfg_rank() -> int:
    return get_cfg_group().rank_in_group


def get_cfg_world_size() -> int:
    return get_cfg_group().world_size


def get_dp_rank() -> int:
    return get_dp_group().rank_in_group


def get_dp_world_size() -> int:
    return get_dp_group().world_size


def get_device_mesh():
    """A ``DeviceMesh`` with dims ``(dp, cfg, ring, ulysses, tp)`` over the same layout,
    built on first use (it creates torch's own groups for each dimension)."""
    global _DEVICE_MESH
    if _DEVICE_MESH is None:
        from torch.distributed.device_mesh import init_device_mesh

        config = get_parallel_config()
        sizes = config.sizes
        _DEVICE_MESH = init_device_mesh(
            get_world_group().device.type, tuple(sizes.values()), mesh_dim_names=tuple(sizes)
        )
    return _DEVICE_MESH
