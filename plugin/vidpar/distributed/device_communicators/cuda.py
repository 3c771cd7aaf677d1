"""CudaCommunicator: each CUDA collective through torch's NCCL or through pynccl, chosen
per operation and message size by :func:`choose_path`, a pure function.

``communicator=torch`` and ``communicator=pynccl`` force a path (pynccl where it can take
the call: its dtypes, reduce ops, contiguous tensors on the group's device).
``communicator=auto`` only picks what has been validated on the running kind of machine:
one-rank pynccl was validated on one GPU; pynccl with several ranks (and symmetric
memory) has not been run on a multi-GPU machine yet, so ``auto`` keeps every multi-rank
call on torch's NCCL until :data:`MULTI_RANK_VALIDATED` names it.
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup, ReduceOp

from vidpar.distributed.device_communicators.base import DeviceCommunicator
from vidpar.distributed.device_communicators.nccl_library import (
    NcclError,
    NcclLoadError,
    load_nccl,
)
from vidpar.distributed.device_communicators.pynccl import PyNcclCommunicator

logger = logging.getLogger(__name__)

PREFERENCES = ("auto", "torch", "pynccl")
#: The operations a path is chosen for (send and recv are one: both ends must agree).
OPS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "broadcast", "p2p", "gather")
PYNCCL_OPS = frozenset(OPS) - {"gather"}
#: Paths validated with several ranks on a multi-GPU machine; ``auto`` uses no other there.
MULTI_RANK_VALIDATED: frozenset[str] = frozenset()
#: ``auto``: messages up to this size take pynccl (launch latency dominates), larger ones
#: torch's NCCL (the same kernels, plus torch's watchdog). Provisional until multi-GPU
#: latency has been measured.
SMALL_MESSAGE_BYTES = 1 << 20
NOT_VALIDATED = (
    "auto keeps multi-rank pynccl and symmetric memory off until a multi-GPU run validates them"
)


class Choice(NamedTuple):
    path: str  # "torch" or "pynccl"
    reason: str


def choose_path(
    prefer: str,
    op: str,
    nbytes: int,
    world_size: int,
    capturing: bool,
    pynccl_ready: bool,
    validated: frozenset[str] = MULTI_RANK_VALIDATED,
    small_bytes: int = SMALL_MESSAGE_BYTES,
) -> Choice:
    """The path for one call. ``pynccl_ready``: a pynccl communicator exists and can take
    this call. Every input must be equal on all ranks of the group (they are: sizes of
    equal-size collectives, the shared preference, the agreed pynccl state, capture)."""
    if op not in OPS:
        raise ValueError(f"unknown operation {op!r}; choose from {OPS}")
    if prefer not in PREFERENCES:
        raise ValueError(f"prefer must be one of {PREFERENCES}, got {prefer!r}")
    if op not in PYNCCL_OPS:
        return Choice("torch", f"pynccl has no {op}")
    if prefer == "torch":
        return Choice("torch", "communicator=torch")
    if prefer == "auto" and world_size > 1 and "pynccl" not in validated:
        return Choice("torch", NOT_VALIDATED)
    if not pynccl_ready:
        return Choice("torch", "pynccl cannot take this call")
    if prefer == "pynccl":
        return Choice("pynccl", "communicator=pynccl")
    if capturing:
        return Choice("pynccl", "CUDA-graph capture")
    if nbytes <= small_bytes:
        return Choice("pynccl", "small message")
    return Choice("torch", "large message")


def wants_pynccl(
    prefer: str, world_size: int, validated: frozenset[str] = MULTI_RANK_VALIDATED
) -> bool:
    """Whether a communicator should build pynccl at all (a collective step: every rank
    decides the same)."""
    if prefer == "pynccl":
        return True
    return prefer == "auto" and (world_size == 1 or "pynccl" in validated)


def describe_plan(
    prefer: str,
    world_size: int,
    pynccl_ready: bool,
    validated: frozenset[str] = MULTI_RANK_VALIDATED,
    small_bytes: int = SMALL_MESSAGE_BYTES,
) -> str:
    """One line: the path of each operation (by size and capture where they differ) and
    why."""
    by_path: dict[str, list[str]] = {}
    reasons: dict[str, None] = {}
    for op in OPS:
        small, large, captured = (
            choose_path(prefer, op, n, world_size, cap, pynccl_ready, validated, small_bytes)
            for n, cap in ((small_bytes, False), (small_bytes + 1, False), (small_bytes + 1, True))
        )
        for choice in (small, large, captured):
            reasons.setdefault(choice.reason)
        if small.path == large.path == captured.path:
            key = small.path
        else:
            key = (
                f"{small.path} up to {small_bytes} B, {large.path} above, "
                f"{captured.path} under capture"
            )
        by_path.setdefault(key, []).append(op)
    plan = "; ".join(f"{path}: {', '.join(ops)}" for path, ops in by_path.items())
    return f"{plan} ({'; '.join(reasons)})"


def _all_agree(flag: bool, cpu_group: ProcessGroup | None) -> bool:
    """Whether ``flag`` holds on every rank of ``cpu_group``."""
    if cpu_group is None:
        return flag
    box = torch.tensor([int(flag)], dtype=torch.int32)
    dist.all_reduce(box, op=ReduceOp.MIN, group=cpu_group)
    return bool(box.item())


def build_pynccl(
    cpu_group: ProcessGroup, ranks: list[int], rank_in_group: int, device: torch.device
) -> tuple[PyNcclCommunicator | None, str | None]:
    """A pynccl communicator on every rank of the group, or on none: ``(communicator,
    None)`` or ``(None, why not)``. Collective over ``cpu_group``."""
    problem = None
    try:
        library = load_nccl()
    except NcclLoadError as err:
        library, problem = None, str(err)
    if not _all_agree(library is not None, cpu_group):
        return None, problem or "another rank could not load NCCL"
    comm = None
    try:
        comm = PyNcclCommunicator(cpu_group, ranks, rank_in_group, device, library)
    except NcclError as err:
        problem = str(err)
    if not _all_agree(comm is not None, cpu_group):
        if comm is not None:
            comm.close(abort=True)
        return None, problem or "NCCL failed to start on another rank"
    return comm, None


class CudaCommunicator(DeviceCommunicator):
    """torch's NCCL (the base class) or pynccl for each call, by :func:`choose_path`.

    ``prefer`` is ``auto``, ``torch`` or ``pynccl``. The plan is logged once, when the
    communicator is built. ``gather`` always takes torch's NCCL.
    """

    name = "cuda"

    def __init__(self, *args: Any, prefer: str = "auto") -> None:
        """``args`` as :class:`DeviceCommunicator`'s."""
        if prefer not in PREFERENCES:
            raise ValueError(f"prefer must be one of {PREFERENCES}, got {prefer!r}")
        super().__init__(*args)
        self.prefer = prefer
        self.pynccl: PyNcclCommunicator | None = None
        problem = None
        if wants_pynccl(prefer, self.world_size):
            self.pynccl, problem = build_pynccl(
                self.cpu_group, self.ranks, self.rank_in_group, self.device
            )
        plan = describe_plan(prefer, self.world_size, self.pynccl is not None)
        if problem is not None:
            plan += f"; pynccl unavailable: {problem}"
        log = logger.warning if prefer == "pynccl" and self.pynccl is None else logger.info
        log("communicator for ranks %s on %s (%s): %s", self.ranks, self.device, prefer, plan)

    def path(self, op: str, tensor: torch.Tensor, nbytes: int, reduce_op: Any = None) -> str:
        """The path this call takes (``torch`` or ``pynccl``)."""
        ready = self.pynccl is not None and self.pynccl.supports(tensor, reduce_op)
        capturing = ready and torch.cuda.is_current_stream_capturing()
        return choose_path(self.prefer, op, nbytes, self.world_size, capturing, ready).path

    def close(self, abort: bool = False) -> None:
        if self.pynccl is not None:
            self.pynccl.close(abort)

    # The primitives, each through the chosen path ------------------------------------

    def _all_reduce(self, tensor: torch.Tensor, op: ReduceOp.RedOpType) -> None:
        if self.path("all_reduce", tensor, _nbytes(tensor), op) == "pynccl":
            self.pynccl.all_reduce(tensor, op=op)
        else:
            super()._all_reduce(tensor, op)

    def _all_gather_into(self, out: torch.Tensor, tensor: torch.Tensor) -> None:
        if self.path("all_gather", tensor, _nbytes(out)) == "pynccl":
            self.pynccl.all_gather(out, tensor)
        else:
            super()._all_gather_into(out, tensor)

    def _reduce_scatter_into(
        self, out: torch.Tensor, tensor: torch.Tensor, op: ReduceOp.RedOpType
    ) -> None:
        if self.path("reduce_scatter", tensor, _nbytes(tensor), op) == "pynccl":
            self.pynccl.reduce_scatter(out, tensor, op)
        else:
            super()._reduce_scatter_into(out, tensor, op)

    def _all_to_all_into(self, out: torch.Tensor, tensor: torch.Tensor) -> None:
        if self.path("all_to_all", tensor, _nbytes(tensor)) == "pynccl":
            self.pynccl.all_to_all(out, tensor)
        else:
            super()._all_to_all_into(out, tensor)

    def _broadcast(self, tensor: torch.Tensor, src: int) -> None:
        if self.path("broadcast", tensor, _nbytes(tensor)) == "pynccl":
            self.pynccl.broadcast(tensor, src)
        else:
            super()._broadcast(tensor, src)

    def _send(self, tensor: torch.Tensor, dst: int) -> None:
        if self.path("p2p", tensor, _nbytes(tensor)) == "pynccl":
            self.pynccl.send(tensor, dst)
        else:
            super()._send(tensor, dst)

    def _recv(self, tensor: torch.Tensor, src: int) -> None:
        if self.path("p2p", tensor, _nbytes(tensor)) == "pynccl":
            self.pynccl.recv(tensor, src)
        else:
            super()._recv(tensor, src)


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()
