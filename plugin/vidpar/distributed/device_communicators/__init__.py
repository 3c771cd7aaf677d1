"""Per-device ways to move bytes, and the choice among them."""

from __future__ import annotations

import logging
from typing import Literal

import torch
from torch.distributed import ProcessGroup

from vidpar.distributed.device_communicators.base import DeviceCommunicator
from vidpar.distributed.device_communicators.cpu import CpuCommunicator

CommunicatorKind = Literal["auto", "torch", "pynccl", "symm"]
KINDS: tuple[str, ...] = ("auto", "torch", "pynccl", "symm")
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

    A path that cannot run here (no CUDA, no NCCL library) falls back to torch.distributed
    with one warning, never an error.
    """
    if kind not in KINDS:
        raise ValueError(f"communicator must be one of {KINDS}, got {kind!r}")
    args = (cpu_group, device_group, ranks, rank_in_group, device)
    if device.type != "cuda":
        if kind in ("pynccl", "symm"):
            _warn_once(f"communicator {kind!r} needs CUDA; {device.type} uses gloo instead")
        return CpuCommunicator(*args)
    if kind == "torch":
        return DeviceCommunicator(*args)
    try:
        from vidpar.distributed.device_communicators.cuda import CudaCommunicator
    except ImportError as err:
        _warn_once(f"communicator {kind!r} is unavailable ({err}); using torch's NCCL")
        return DeviceCommunicator(*args)
    return CudaCommunicator(*args, prefer=kind)
