"""PyNcclCommunicator: one NCCL communicator of one group, driven through ctypes.

Every operation is enqueued on torch's current CUDA stream of the communicator's device
and returns at once: no host synchronisation, no side stream, nothing allocated, so a
sequence of them can be captured in a CUDA graph and replayed. Buffers are flat
(contiguous) tensors given by the caller; shapes are the caller's business (see
:class:`~vidpar.distributed.device_communicators.cuda.CudaCommunicator`).

:meth:`PyNcclCommunicator.close` destroys the communicator (``abort=True``: aborts it,
never waiting for peers); one dropped without ``close()`` is destroyed when collected, and
one still open when the interpreter exits is aborted, so nothing hangs on the way out.
"""

from __future__ import annotations

import atexit
import contextlib
import weakref
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup, ReduceOp

from vidpar.distributed.device_communicators.nccl_library import (
    UNIQUE_ID_BYTES,
    NcclError,
    NcclLibrary,
    load_nccl,
    version_text,
)


def share_unique_id(
    library: NcclLibrary, cpu_group: ProcessGroup, ranks: list[int], rank_in_group: int
) -> bytes:
    """The group's ``ncclUniqueId``: made on its first rank (``ranks[0]``), broadcast over
    ``cpu_group`` (gloo). A failure there reaches every rank as :class:`NcclError`."""
    box = torch.zeros(UNIQUE_ID_BYTES + 1, dtype=torch.uint8)
    failure: NcclError | None = None
    if rank_in_group == 0:
        try:
            box[1:] = torch.frombuffer(bytearray(library.unique_id()), dtype=torch.uint8)
            box[0] = 1
        except NcclError as err:
            failure = err
    dist.broadcast(box, group=cpu_group, group_src=dist.get_group_rank(cpu_group, ranks[0]))
    if failure is not None:
        raise failure
    if int(box[0]) != 1:
        raise NcclError("the group's first rank could not make an NCCL unique id", -1)
    return bytes(box[1:].tolist())


def _release(library: NcclLibrary, comm: int, device: torch.device, abort: bool) -> None:
    """Destroy ``comm`` (waits for its queued work), or abort it when asked or when NCCL
    reports an asynchronous error on it (cancels its work, waits for no peer)."""
    if not abort:
        try:
            abort = library.async_error(comm) != 0
        except NcclError:
            abort = True
    with torch.cuda.device(device):
        library.call("ncclCommAbort" if abort else "ncclCommDestroy", comm)


def _release_quietly(library: NcclLibrary, comm: int, device: torch.device) -> None:
    with contextlib.suppress(Exception):
        _release(library, comm, device, abort=False)


#: Communicators not yet closed; the ones still open when the interpreter exits are aborted.
_OPEN: weakref.WeakSet[PyNcclCommunicator] = weakref.WeakSet()


@atexit.register
def _abort_open_communicators() -> None:
    for comm in list(_OPEN):
        with contextlib.suppress(Exception):
            comm.close(abort=True)


class PyNcclCommunicator:
    """NCCL over the ranks of one group, for tensors on ``device``.

    Collective over ``cpu_group``: every rank of the group constructs it together.
    Peers (``src``, ``dst``, ``peer``) are ranks in the group.
    """

    def __init__(
        self,
        cpu_group: ProcessGroup,
        ranks: list[int],
        rank_in_group: int,
        device: torch.device,
        library: NcclLibrary | None = None,
    ) -> None:
        device = torch.device(device)
        if device.type != "cuda":
            raise ValueError(f"pynccl needs a CUDA device, got {device}")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.library = library or load_nccl()
        self.ranks = list(ranks)
        self.world_size = len(self.ranks)
        self.rank_in_group = rank_in_group
        self.device = device
        unique_id = share_unique_id(self.library, cpu_group, self.ranks, rank_in_group)
        with torch.cuda.device(device):
            self._comm: int | None = self.library.init_rank(
                self.world_size, unique_id, rank_in_group
            )
        # Dropped without close(): destroyed when collected (at exit: aborted, see _OPEN).
        self._finalizer = weakref.finalize(
            self, _release_quietly, self.library, self._comm, self.device
        )
        self._finalizer.atexit = False
        _OPEN.add(self)

    def __repr__(self) -> str:
        state = "closed" if self._comm is None else f"NCCL {version_text(self.library.version)}"
        return f"PyNcclCommunicator(ranks={self.ranks}, {self.device}, {state})"

    @property
    def closed(self) -> bool:
        return self._comm is None

    def supports(self, tensor: torch.Tensor, op: Any = None) -> bool:
        """Whether ``tensor`` (and reduce ``op``) can go through this communicator: on its
        device, contiguous, of a dtype (and op) this NCCL has."""
        return (
            self._comm is not None
            and tensor.device == self.device
            and tensor.is_contiguous()
            and self.library.dtype(tensor.dtype) is not None
            and (op is None or self.library.reduce_op(op) is not None)
        )

    # Collectives ---------------------------------------------------------------------

    def all_reduce(
        self, tensor: torch.Tensor, out: torch.Tensor | None = None, op: Any = ReduceOp.SUM
    ) -> torch.Tensor:
        """Reduce ``tensor`` over the group into ``out`` (default: in place); returns it."""
        out = tensor if out is None else out
        dtype = self._check(tensor, out)
        self._expect(out, tensor.numel(), "all_reduce: out")
        self._enqueue(
            "ncclAllReduce",
            tensor.data_ptr(),
            out.data_ptr(),
            tensor.numel(),
            dtype,
            self._reduce_op(op),
            count=tensor.numel(),
        )
        return out

    def all_gather(self, out: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's ``tensor`` into ``out`` (``world_size × tensor``), rank order."""
        dtype = self._check(tensor, out)
        self._expect(out, tensor.numel() * self.world_size, "all_gather: out")
        self._enqueue(
            "ncclAllGather",
            tensor.data_ptr(),
            out.data_ptr(),
            tensor.numel(),
            dtype,
            count=tensor.numel(),
        )
        return out

    def reduce_scatter(
        self, out: torch.Tensor, tensor: torch.Tensor, op: Any = ReduceOp.SUM
    ) -> torch.Tensor:
        """Reduce ``tensor`` over the group; this rank's chunk into ``out``."""
        dtype = self._check(tensor, out)
        self._expect(tensor, out.numel() * self.world_size, "reduce_scatter: input")
        self._enqueue(
            "ncclReduceScatter",
            tensor.data_ptr(),
            out.data_ptr(),
            out.numel(),
            dtype,
            self._reduce_op(op),
            count=out.numel(),
        )
        return out

    def all_to_all(self, out: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
        """Chunk ``i`` of ``tensor`` to rank ``i``; rank ``j``'s chunk lands in chunk ``j``
        of ``out`` (equal chunks; grouped send/recv)."""
        dtype = self._check(tensor, out)
        self._expect(out, tensor.numel(), "all_to_all: out")
        if tensor.numel() % self.world_size:
            raise ValueError(
                f"all_to_all: {tensor.numel()} elements do not split into {self.world_size}"
            )
        chunk = tensor.numel() // self.world_size
        if chunk == 0:
            return out
        step = chunk * tensor.element_size()
        send, recv = tensor.data_ptr(), out.data_ptr()
        comm, stream = self._handle(), self._stream()
        with self.group():
            for peer in range(self.world_size):
                self.library.call(
                    "ncclSend", send + peer * step, chunk, dtype, peer, comm, stream, comm=comm
                )
                self.library.call(
                    "ncclRecv", recv + peer * step, chunk, dtype, peer, comm, stream, comm=comm
                )
        return out

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Rank ``src``'s ``tensor`` into every rank's ``tensor`` (in place)."""
        dtype = self._check(tensor)
        self._peer(src)
        self._enqueue(
            "ncclBroadcast",
            tensor.data_ptr(),
            tensor.data_ptr(),
            tensor.numel(),
            dtype,
            src,
            count=tensor.numel(),
        )
        return tensor

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        """Send ``tensor`` to rank ``dst``. Blocks the stream until ``dst`` receives; pair
        a send and a receive of one rank inside :meth:`group` to run them together."""
        dtype = self._check(tensor)
        self._peer(dst)
        self._enqueue(
            "ncclSend", tensor.data_ptr(), tensor.numel(), dtype, dst, count=tensor.numel()
        )

    def recv(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        """Receive into ``tensor`` from rank ``src``; returns it."""
        dtype = self._check(tensor)
        self._peer(src)
        self._enqueue(
            "ncclRecv", tensor.data_ptr(), tensor.numel(), dtype, src, count=tensor.numel()
        )
        return tensor

    @contextlib.contextmanager
    def group(self) -> Iterator[None]:
        """``ncclGroupStart`` … ``ncclGroupEnd``: the operations inside launch together
        (needed for a rank that sends and receives at once, e.g. to itself)."""
        self.library.call("ncclGroupStart")
        try:
            yield
        except BaseException:
            with contextlib.suppress(NcclError):
                self.library.call("ncclGroupEnd")
            raise
        self.library.call("ncclGroupEnd", comm=self._comm)

    # Lifetime ------------------------------------------------------------------------

    def close(self, abort: bool = False) -> None:
        """Destroy the communicator (idempotent). ``abort=True``, or an asynchronous error
        on it, aborts instead: outstanding operations are cancelled and nothing waits for
        peers (the path for a rank that is dying or whose peers are gone). NCCL's destroy
        waits for CUDA graphs that captured this communicator's work: release them first
        (seen on one H200: a destroy with such a graph alive never returned)."""
        comm, self._comm = self._comm, None
        if comm is None:
            return
        self._finalizer.detach()
        _OPEN.discard(self)
        _release(self.library, comm, self.device, abort)

    # Helpers -------------------------------------------------------------------------

    def _handle(self) -> int:
        if self._comm is None:
            raise RuntimeError("this NCCL communicator is closed")
        return self._comm

    def _stream(self) -> int:
        return torch.cuda.current_stream(self.device).cuda_stream

    def _enqueue(self, name: str, *args: Any, count: int) -> None:
        """``name(*args, comm, stream)`` on the current stream; nothing for no elements."""
        comm = self._handle()
        if count:
            self.library.call(name, *args, comm, self._stream(), comm=comm)

    def _check(self, *tensors: torch.Tensor) -> int:
        """The NCCL dtype of ``tensors`` (all on this device, contiguous, one dtype)."""
        first = tensors[0]
        for tensor in tensors:
            if tensor.device != self.device:
                raise ValueError(f"pynccl on {self.device} got a tensor on {tensor.device}")
            if not tensor.is_contiguous():
                raise ValueError("pynccl needs contiguous tensors")
            if tensor.dtype != first.dtype:
                raise ValueError(f"pynccl got {first.dtype} and {tensor.dtype} in one call")
        dtype = self.library.dtype(first.dtype)
        if dtype is None:
            raise ValueError(f"NCCL {version_text(self.library.version)} has no {first.dtype}")
        return dtype

    def _reduce_op(self, op: Any) -> int:
        code = self.library.reduce_op(op)
        if code is None:
            raise ValueError(f"NCCL {version_text(self.library.version)} has no reduce op {op}")
        return code

    def _expect(self, tensor: torch.Tensor, numel: int, what: str) -> None:
        if tensor.numel() != numel:
            raise ValueError(f"{what} has {tensor.numel()} elements, expected {numel}")

    def _peer(self, rank: int) -> None:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is not in a group of {self.world_size}")
