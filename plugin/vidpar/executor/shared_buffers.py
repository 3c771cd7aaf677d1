"""Tensors in shared memory of their own (memfds) that the wire passes as that memory: a
worker fills one and returns it, and the caller maps the same pages, with no copy. This
module keeps the live buffers of the process (address, size, descriptor), so the wire can
tell whether a buffer it sends lies in one."""

from __future__ import annotations

import math
import mmap
import os
import sys
import weakref

import numpy as np
import torch

HAS_MEMFD = hasattr(os, "memfd_create") and sys.platform.startswith("linux")


class _SharedMapping(mmap.mmap):
    """A shared mapping of a memfd (a subclass, so that it takes weak references)."""


#: The live shared buffers of this process: ``id`` of the mapping -> (address, size, fd).
_SHARED: dict[int, tuple[int, int, int]] = {}


def _release_shared(key: int, fd: int) -> None:
    _SHARED.pop(key, None)
    os.close(fd)


def live_shared_buffers() -> int:
    """How many shared buffers of this process are alive."""
    return len(_SHARED)


def shared_empty(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor in shared memory of its own (a memfd): sent in a message
    (itself, a contiguous view of it or a numpy array over it), it crosses as that memory,
    with no copy, and the receiver's array maps the same pages. Fill it before sending it
    and leave it alone afterwards (the receiver may see later writes). Two views of one
    such buffer in a message arrive sharing memory. The memory is freed when the last
    tensor over it here and the last array over it at the receivers are gone. Off Linux,
    a plain tensor."""
    nbytes = math.prod(shape) * dtype.itemsize
    if not HAS_MEMFD or nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    fd = os.memfd_create("vidpar-shared", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, nbytes)
        mapping = _SharedMapping(fd, nbytes)
    except BaseException:
        os.close(fd)
        raise
    raw = torch.frombuffer(mapping, dtype=torch.uint8)  # keeps the mapping alive
    key = id(mapping)
    _SHARED[key] = (raw.data_ptr(), nbytes, fd)
    weakref.finalize(mapping, _release_shared, key, fd)
    return raw.view(dtype).view(shape)


def shared_region(buffer: memoryview) -> tuple[int, int] | None:
    """``(key, offset)`` of the shared buffer ``buffer`` lies in, if it lies in one."""
    if not _SHARED:
        return None
    address = np.frombuffer(buffer, dtype=np.uint8).ctypes.data
    for key, (start, size, _) in list(_SHARED.items()):  # finalizers may pop meanwhile
        if start <= address and address + buffer.nbytes <= start + size:
            return key, address - start
    return None


def shared_descriptor(key: int) -> int:
    """The memfd of the live shared buffer ``key`` (from :func:`shared_region`)."""
    return _SHARED[key][2]
