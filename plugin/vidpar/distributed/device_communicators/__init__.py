"""Per-device ways to move bytes, and the choice among them.

``communicator`` (of ``initialize_model_parallel``, the Executor and the strategy):

- ``auto``: on CUDA, :class:`CudaCommunicator` picks per call what has been validated on
  this kind of machine (today: torch's NCCL for every group of several ranks); on CPU, gloo.
- ``torch``: torch.distributed's own backend for the device (NCCL on CUDA).
- ``pynccl``: NCCL through ctypes on the caller's stream (:mod:`.pynccl`), where it can
  take the call; torch's NCCL otherwise. Without CUDA or NCCL: one warning, then the
  device's torch backend.
- ``symm``: torch symmetric memory, not available yet: asking for it is an error (a
  silent fallback would make a run or a benchmark claim a path it never took).
"""

from __future__ import annotations

import logging

import torch
from torch.distributed import ProcessGroup

from vidpar.distributed.device_communicators.base import DeviceCommunicator
from vidpar.distributed.device_communicators.cpu import CpuCommunicator
from vidpar.distributed.device_communicators.cuda import CudaCommunicator

KINDS: tuple[str, ...] = ("auto", "torch", "pynccl", "symm")
SYMM_UNAVAILABLE = (
    "communicator='symm' (torch symmetric memory) is not available yet: it has not been "
    "validated on a multi-GPU machine; use auto, torch or pynccl"
)
logger = logging.getLogger(__name__)
_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        logger.warning(message)


def create_communicator(
    kind: str,
    cpu_group: ProcessGroup,
    device_group: ProcessGroup,
    ranks: list[int],
    rank_in_group: int,
    device: torch.device,
) -> DeviceCommunicator:
    """The communicator for ``device``: ``kind`` asks for a path, ``auto`` picks the best.

    Collective over the group on CUDA (pynccl shares its id over ``cpu_group``). A path
    that cannot run here (no CUDA, no NCCL library) falls back to torch.distributed with
    one warning; ``symm`` raises ``ValueError`` (see the module's docs).
    """
    if kind not in KINDS:
        raise ValueError(f"communicator must be one of {KINDS}, got {kind!r}")
    if kind == "symm":
        raise ValueError(SYMM_UNAVAILABLE)
    args = (cpu_group, device_group, ranks, rank_in_group, device)
    if device.type != "cuda":
        if kind == "pynccl":
            _warn_once(f"communicator {kind!r} needs CUDA; {device.type} uses gloo instead")
        return CpuCommunicator(*args)
    if kind == "torch":
        return DeviceCommunicator(*args)
    return CudaCommunicator(*args, prefer=kind)


__all__ = [
    "KINDS",
    "CpuCommunicator",
    "CudaCommunicator",
    "DeviceCommunicator",
    "create_communicator",
]
