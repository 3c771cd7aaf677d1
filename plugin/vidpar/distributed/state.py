"""ParallelState: the one registry of a process's groups, and the road that builds it.

:func:`init_distributed_environment` joins the torch.distributed world once per process;
:func:`initialize_model_parallel` turns a :class:`~vidpar.config.ParallelConfig` into the
current :class:`ParallelState` (every group of the layout as a
:class:`~vidpar.distributed.group.GroupCoordinator`, and one ``DeviceMesh`` over the very
same process groups). Layers and getters resolve groups through
:func:`get_parallel_state`; without a layout that is :meth:`ParallelState.single`, a world
of one that never communicates. :func:`parallel_context` does all of it and tears it down.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from vidpar.config import DIMS, GROUP_DIMS, ParallelConfig
from vidpar.distributed.group import GroupCoordinator

logger = logging.getLogger(__name__)


class ParallelState:
    """One process's view of a layout: the layout (``parallel``, resolved against the
    world size), a :class:`GroupCoordinator` per group name (``GROUP_DIMS``) and a
    ``DeviceMesh`` whose dims are the layout's (``DIMS``), built from the same process
    groups.

    :meth:`group` is the one way to resolve a group.
    """

    def __init__(
        self,
        parallel: ParallelConfig,
        groups: Mapping[str, GroupCoordinator],
        mesh_groups: Mapping[str, ProcessGroup] | None = None,
    ) -> None:
        self.parallel = parallel
        self.groups = dict(groups)
        self._mesh_groups = dict(mesh_groups or {})
        self._mesh = None

    @classmethod
    def single(cls) -> ParallelState:
        """A world of one: every group has this process alone and communicates nothing."""
        rank = dist.get_rank() if dist.is_initialized() else 0
        state = _SINGLE.get(rank)
        if state is None:
            device = _ENV_WORLD.device if _ENV_WORLD is not None else torch.device("cpu")
            groups = {
                name: GroupCoordinator(name, [rank], None, None, device) for name in GROUP_DIMS
            }
            state = _SINGLE[rank] = cls(ParallelConfig(world_size=1), groups)
        return state

    @property
    def is_single(self) -> bool:
        """Whether this is a world of one (nothing is split, nothing communicated)."""
        return self.parallel.world_size == 1

    @property
    def rank(self) -> int:
        """This process's global rank."""
        return self.groups["world"].rank

    @property
    def device(self) -> torch.device:
        return self.groups["world"].device

    def group(self, name: str) -> GroupCoordinator:
        """The coordinator of this process's group ``name`` (``"tp"``, ``"sp"``, ...)."""
        try:
            return self.groups[name]
        except KeyError:
            raise ValueError(
                f"unknown group {name!r}; known groups: {sorted(self.groups)}"
            ) from None

    def check_heads(self, num_heads: int) -> None:
        """Every rank of ulysses × tp needs a head (any count splits, unevenly if need be):
        raise ``ValueError`` naming the numbers."""
        self.parallel.check_heads(num_heads)

    @property
    def mesh(self):
        """A ``DeviceMesh`` whose dims are :data:`~vidpar.config.DIMS` over this layout's own
        process groups (made from them, so no group is created twice)."""
        if self._mesh is None:
            if not self._mesh_groups:
                raise RuntimeError(
                    "this ParallelState has no process groups (a single process without "
                    "torch.distributed): a DeviceMesh needs initialize_model_parallel(parallel)"
                )
            from torch.distributed.device_mesh import DeviceMesh

            sizes = self.parallel.sizes
            ranks = torch.arange(self.parallel.world_size).view(*sizes.values())
            self._mesh = DeviceMesh.from_group(
                [self._mesh_groups[d] for d in DIMS],
                self.device.type,
                ranks,
                mesh_dim_names=DIMS,
            )
        return self._mesh

    def rank_table(self) -> dict[str, list[int]]:
        """``{group name: ranks}`` of this process's groups (what a layout gives a rank)."""
        return {name: list(g.ranks) for name, g in sorted(self.groups.items())}

    def __repr__(self) -> str:
        return f"ParallelState({self.parallel.describe()}, rank={self.rank})"


# The world ---------------------------------------------------------------------------

_ENV_WORLD: GroupCoordinator | None = None
_STATE: ParallelState | None = None
_SINGLE: dict[int, ParallelState] = {}
_SINGLE_DEPTH = 0
_OWNED_PROCESS_GROUP = False
_CREATED: list[ProcessGroup] = []


def default_device(local_rank: int) -> torch.device:
    """``cuda:local_rank`` (modulo the visible GPUs) where CUDA exists, else the CPU."""
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
    store: dist.Store | None = None,
) -> None:
    """Join the torch.distributed world (from arguments, a ``store``, or the
    ``RANK``/``WORLD_SIZE`` environment) unless already joined, and make the world group.

    The backend defaults to NCCL on CUDA and gloo otherwise.
    """
    global _ENV_WORLD, _OWNED_PROCESS_GROUP
    local_rank = int(os.environ.get("LOCAL_RANK", 0)) if local_rank is None else local_rank
    device = default_device(local_rank)
    if not dist.is_initialized():
        world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
        rank = int(os.environ.get("RANK", 0)) if rank is None else rank
        if store is None and init_method is None and "MASTER_ADDR" not in os.environ:
            raise RuntimeError(
                "no rendezvous address: pass init_method='tcp://host:port' or set "
                "MASTER_ADDR and MASTER_PORT (torchrun does this for you)"
            )
        backend = backend or ("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(
            backend,
            init_method=None if store is not None else init_method or "env://",
            store=store,
            world_size=world_size,
            rank=rank,
            timeout=timeout,
            device_id=device if backend == "nccl" else None,
        )
        _OWNED_PROCESS_GROUP = True
    if _ENV_WORLD is None:
        ranks = list(range(dist.get_world_size()))
        cpu_group, device_group = _world_groups()
        _ENV_WORLD = GroupCoordinator("world", ranks, cpu_group, device_group, device)


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
    parallel: ParallelConfig, world: GroupCoordinator
) -> dict[tuple[int, ...], tuple[ProcessGroup, ProcessGroup]]:
    """Torch groups ``(cpu, device)`` for every rank set of the layout, each created once.

    ``new_group`` is collective over the whole world, so every process walks the same
    rank sets in the same order; identical rank sets (sp and ulysses when ring is 1) share
    their groups, and the world reuses the default group. Sets of one rank get a device
    group too when the world is larger (a ``DeviceMesh`` dim of size 1 needs one).
    """
    world_ranks = tuple(range(parallel.world_size))
    groups = {world_ranks: (world.cpu_group, world.device_group)}
    gloo_devices = dist.get_backend() == "gloo"
    rank_sets = [r for name in GROUP_DIMS for r in parallel.group_ranks(name)]
    rank_sets += [[r] for r in range(parallel.world_size)]
    for ranks in rank_sets:
        key = tuple(ranks)
        if key in groups:
            continue
        device_group = _new_group(ranks, None)
        cpu_group = device_group if gloo_devices or len(ranks) == 1 else _new_group(ranks, "gloo")
        groups[key] = (cpu_group, device_group)
    return groups


def initialize_model_parallel(
    parallel: ParallelConfig, communicator: str = "auto"
) -> ParallelState:
    """Build every group of the layout ``parallel`` and make it the current
    :class:`ParallelState`, whose ``parallel`` is the one resolved layout from then on.

    Every process of the world must call this with the same layout. One not yet resolved
    against this world (``world_size`` unset, or ``dp=-1`` from a smaller world) is
    resolved here, where the world size is known; a resolved one is taken as it is.
    """
    global _STATE
    if _ENV_WORLD is None:
        raise RuntimeError("call init_distributed_environment() before initialize_model_parallel()")
    if _STATE is not None:
        raise RuntimeError("model parallel groups are already initialised; destroy them first")
    parallel = parallel.resolve(dist.get_world_size())
    rank, world = dist.get_rank(), _ENV_WORLD
    torch_groups = _create_groups(parallel, world)
    coordinators = {"world": world}
    for name in GROUP_DIMS:
        if name != "world":
            ranks = parallel.group_of(name, rank)
            cpu_group, device_group = torch_groups[tuple(ranks)]
            coordinators[name] = GroupCoordinator(
                name, ranks, cpu_group, device_group, world.device, communicator
            )
    mesh_groups = {dim: torch_groups[tuple(parallel.group_of(dim, rank))][1] for dim in DIMS}
    _STATE = ParallelState(parallel, coordinators, mesh_groups)
    logger.info(
        "vidpar layout %s; rank %d at %s", parallel.describe(), rank, parallel.coordinates(rank)
    )
    return _STATE


def model_parallel_is_initialized() -> bool:
    """Whether :func:`initialize_model_parallel` has run (and not been destroyed)."""
    return _STATE is not None


def get_parallel_state() -> ParallelState:
    """The current layout: the initialised one, or :meth:`ParallelState.single` (no layout,
    or inside :func:`single_process`)."""
    if _STATE is None or _SINGLE_DEPTH:
        return ParallelState.single()
    return _STATE


@contextlib.contextmanager
def single_process() -> Iterator[ParallelState]:
    """Inside, :func:`get_parallel_state` is a world of one: layers built here neither split
    nor communicate (a single-device reference model, an unsharded copy, ...)."""
    global _SINGLE_DEPTH
    _SINGLE_DEPTH += 1
    try:
        yield ParallelState.single()
    finally:
        _SINGLE_DEPTH -= 1


def destroy_model_parallel(abort: bool = False) -> None:
    """Forget the current layout: close its communicators (``abort=True`` when peers may be
    gone) and destroy the torch groups vidpar created for it."""
    global _STATE
    if _STATE is not None:
        for coordinator in _STATE.groups.values():
            if coordinator is not _ENV_WORLD:
                coordinator.close(abort)
    for group in _CREATED:
        with contextlib.suppress(Exception):
            dist.destroy_process_group(group)
    _CREATED.clear()
    _STATE = None


def destroy_distributed_environment() -> None:
    """Leave the torch.distributed world if :func:`init_distributed_environment` joined it."""
    global _ENV_WORLD, _OWNED_PROCESS_GROUP
    destroy_model_parallel()
    if _ENV_WORLD is not None:
        _ENV_WORLD.close()
    _ENV_WORLD = None
    _SINGLE.clear()
    if _OWNED_PROCESS_GROUP and dist.is_initialized():
        dist.destroy_process_group()
    _OWNED_PROCESS_GROUP = False


@contextlib.contextmanager
def parallel_context(
    parallel: ParallelConfig, communicator: str = "auto", **init_kwargs: Any
) -> Iterator[ParallelState]:
    """Join the world, build the groups of the layout ``parallel``, and tear both down on
    exit."""
    init_distributed_environment(**init_kwargs)
    try:
        yield initialize_model_parallel(parallel, communicator)
    finally:
        destroy_distributed_environment()


# Getters: one per group name of vidpar.config.GROUP_DIMS, delegates to the current state


def get_world_group() -> GroupCoordinator:
    """The whole world: the layout's, else the joined world's, else a world of one."""
    if _STATE is None and _ENV_WORLD is not None and not _SINGLE_DEPTH:
        return _ENV_WORLD
    return get_parallel_state().group("world")


def get_tp_group() -> GroupCoordinator:
    """The current layout's tensor-parallel group (heads and FFN columns are split over it)."""
    return get_parallel_state().group("tp")


def get_sp_group() -> GroupCoordinator:
    """The current layout's sequence-parallel group (ulysses × ring: tokens are split over it)."""
    return get_parallel_state().group("sp")


def get_ulysses_group() -> GroupCoordinator:
    """The current layout's Ulysses group (the all-to-all of attention runs over it)."""
    return get_parallel_state().group("ulysses")


def get_ring_group() -> GroupCoordinator:
    """The current layout's ring group (K/V blocks travel around it)."""
    return get_parallel_state().group("ring")


def get_cfg_group() -> GroupCoordinator:
    """The current layout's classifier-free-guidance group (conditional and unconditional
    branches run on its two ranks)."""
    return get_parallel_state().group("cfg")


def get_dp_group() -> GroupCoordinator:
    """The current layout's data-parallel group (each member sees other samples)."""
    return get_parallel_state().group("dp")


def get_dp_sp_group() -> GroupCoordinator:
    """The current layout's dp × sp group (gradients of one tp shard are averaged over
    it)."""
    return get_parallel_state().group("dp_sp")


def get_replica_group() -> GroupCoordinator:
    """The current layout's replica group (cfg × sp × tp: the ranks that share a batch; a
    pipeline's VAE and text encoder are split over it)."""
    return get_parallel_state().group("replica")


def get_parallel_config() -> ParallelConfig:
    """The current layout (``get_parallel_state().parallel``; the name users of vLLM and
    FastVideo know)."""
    return get_parallel_state().parallel


def get_device_mesh():
    """The current layout's ``DeviceMesh`` (see :attr:`ParallelState.mesh`)."""
    return get_parallel_state().mesh
