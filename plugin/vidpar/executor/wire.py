"""The Executor's wire: its messages, as frames over a pipe, bulk data through shared memory.

The parent sends :class:`Request` (one RPC) and :class:`Shutdown`; a worker answers a
request with :class:`Reply` or :class:`ErrorReply` and its start-up with :class:`Ready` or
:class:`ErrorReply`. Every message is one ``Connection.send_bytes`` frame. Its first byte
holds flags. Without ``_FLAG_FD`` the rest is a pickle of ``(tag, *fields)``. With it, a
segment table follows and file descriptors (memfds) are passed right after the frame
over the same Unix socket; large buffers (tensors, numpy arrays; and the pickle itself when
it is large) live in that shared memory, mapped copy-on-write by each receiver. A buffer is
written once by the sender into a memfd of the message's own, unless it already lies in
shared memory made by :func:`shared_empty`: then that memory itself is passed, and the
bytes are not copied at all (a worker that fills such a tensor and returns it hands the
caller its pages). A request broadcast to N workers is encoded once and the same bytes and
the same memory go to every worker. Nothing is named in the file system, so nothing leaks
when a process is killed. (Without ``memfd_create``, i.e. off Linux, everything goes
through the pipe.)

Each process keeps the :func:`time.perf_counter` stamps of its last encode and decode
(:data:`last_times`); on Linux that clock is system-wide, so stamps of the caller and its
workers can be put on one time line.
"""

from __future__ import annotations

import contextlib
import copyreg
import io
import math
import mmap
import os
import pickle
import socket
import struct
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any, ClassVar, NamedTuple

import torch

from vidpar.executor.shared_buffers import HAS_MEMFD, shared_descriptor, shared_region

#: Buffers of at least this many bytes travel through shared memory, not the pipe.
OOB_MIN_BYTES = 1 << 16
#: Pickles longer than this travel through shared memory too, so pipe frames stay small.
INLINE_MAX_BYTES = 1 << 16
_ALIGN = 64
_FLAG_FD = 1
_FLAG_BODY_IN_SHM = 2
_COUNT = struct.Struct("<I")
#: A segment: the index of its descriptor in the message's list, its offset there, its size.
_SEGMENT = struct.Struct("<IQQ")
#: Descriptors one message passes at most (Linux takes 253 per message); shared buffers
#: past this count are copied into the message's own memfd.
_MAX_FDS = 200

#: This process's last :func:`encode` and :func:`decode`, as :func:`time.perf_counter`
#: stamps: ``encode_start``, ``encode_end``, ``decode_start``, ``decode_end``.
last_times: dict[str, float] = {}


# Messages ------------------------------------------------------------------------------

#: The sequence number of a worker's start-up messages (requests count from 1).
STARTUP_SEQ = 0


class Request(NamedTuple):
    """Run ``method`` (an RPC's name, or a callable taking the worker first) on a worker."""

    seq: int
    method: str | Callable[..., Any]
    args: tuple
    kwargs: dict[str, Any]

    @property
    def name(self) -> str:
        """The method's name, for messages."""
        method = self.method
        return method if isinstance(method, str) else getattr(method, "__qualname__", "callable")


class Shutdown(NamedTuple):
    """Release the payload and the process groups, then end (no answer)."""


class Ready(NamedTuple):
    """A worker has started: its rank, process id and device."""

    rank: int
    pid: int
    device: str
    seq: int = STARTUP_SEQ


class Reply(NamedTuple):
    """The value request ``seq`` returned."""

    seq: int
    value: Any


class ExceptionInfo(NamedTuple):
    """An exception raised in a worker, as it crosses the wire: its type's name, message,
    formatted traceback and, when it pickles, the exception itself."""

    exc_type: str
    message: str
    traceback: str
    pickled: bytes | None = None

    @classmethod
    def of(cls, exc: BaseException, note: str = "") -> ExceptionInfo:
        try:
            pickled = pickle.dumps(exc, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception:
            pickled = None
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        return cls(type(exc).__name__, str(exc), f"{note}\n{text}" if note else text, pickled)

    def exception(self) -> BaseException | None:
        """The original exception, when it can be unpickled here."""
        if self.pickled is None:
            return None
        try:
            return pickle.loads(self.pickled)
        except Exception:
            return None


class ErrorReply(NamedTuple):
    """Request ``seq`` (``STARTUP_SEQ``: the start-up; ``None``: not known, as when the
    request or the reply could not be unpickled) raised ``error``."""

    seq: int | None
    error: ExceptionInfo


#: What a worker may answer.
Answer = Ready | Reply | ErrorReply
#: Every message, by the tag it crosses the wire with: a message is pickled as the plain
#: tuple ``(tag, *fields)``, so no class is looked up by name on either side (that would
#: cost a no-op RPC more than the rest of its pickling).
MESSAGES: tuple[type, ...] = (Request, Shutdown, Ready, Reply, ErrorReply)
_TAGS = {kind: tag for tag, kind in enumerate(MESSAGES)}
Message = Request | Shutdown | Ready | Reply | ErrorReply


def _rebuild_tensor(
    data: Any, dtype: torch.dtype, shape: tuple[int, ...], requires_grad: bool, parameter: bool
) -> torch.Tensor:
    """Inverse of :func:`_reduce_tensor`: a tensor over ``data`` without a copy."""
    if math.prod(shape) == 0:
        tensor = torch.empty(shape, dtype=dtype)
    else:
        tensor = torch.frombuffer(data, dtype=torch.uint8).view(dtype).view(shape)
    if parameter:
        return torch.nn.Parameter(tensor, requires_grad=requires_grad)
    return tensor.requires_grad_(requires_grad) if requires_grad else tensor


def _reduce_tensor(tensor: torch.Tensor) -> tuple:
    """Dense tensors as raw bytes (a :class:`pickle.PickleBuffer`, so big ones go out of
    band); anything exotic (sparse, quantized, nested, meta, subclasses) the default way."""
    if (
        tensor.layout != torch.strided
        or tensor.is_quantized
        or tensor.is_nested
        or tensor.device.type == "meta"
    ):
        return tensor.__reduce_ex__(pickle.HIGHEST_PROTOCOL)
    data = tensor.detach()
    if data.device.type != "cpu":
        data = data.cpu()
    data = data.resolve_conj().resolve_neg().contiguous()
    raw = data.reshape(-1).view(torch.uint8).numpy()
    return _rebuild_tensor, (
        pickle.PickleBuffer(raw),
        data.dtype,
        tuple(data.shape),
        tensor.requires_grad,
        type(tensor) is torch.nn.Parameter,
    )


class _Pickler(pickle.Pickler):
    dispatch_table: ClassVar[dict] = {
        **copyreg.dispatch_table,
        torch.Tensor: _reduce_tensor,
        torch.nn.Parameter: _reduce_tensor,
    }


def _write_all(fd: int, data: memoryview, offset: int) -> None:
    while data.nbytes:
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written


def encode(message: Message) -> tuple[bytes, list[int]]:
    """One frame for ``message`` and the memfds that hold its bulk data (none for a small
    message).

    The caller sends the frame, then the descriptors (:meth:`Channel.send_encoded`) to as
    many receivers as it likes, and closes the descriptors afterwards.

    Tensors cross as contiguous CPU tensors holding just their own elements (a slice of a
    big tensor does not drag the whole storage along); the same tensor object twice is
    sent once, but distinct tensors that view one storage arrive as independent copies
    (unless that storage is a :func:`shared_empty` buffer).
    """
    last_times["encode_start"] = time.perf_counter()
    out = io.BytesIO()
    out.write(b"\x00")
    buffers: list[memoryview] = []

    def out_of_band(buffer: pickle.PickleBuffer) -> bool:
        try:
            raw = buffer.raw()
        except BufferError:  # not contiguous: keep it in the pickle
            return True
        if raw.nbytes < OOB_MIN_BYTES:
            return True
        buffers.append(raw)
        return False

    _Pickler(
        out, protocol=pickle.HIGHEST_PROTOCOL, buffer_callback=out_of_band if HAS_MEMFD else None
    ).dump((_TAGS[type(message)], *message))
    if not buffers and (out.tell() <= INLINE_MAX_BYTES + 1 or not HAS_MEMFD):
        last_times["encode_end"] = time.perf_counter()
        return out.getvalue(), []

    flags = _FLAG_FD
    body = out.getbuffer()[1:]
    segments = buffers
    if body.nbytes > INLINE_MAX_BYTES:
        flags |= _FLAG_BODY_IN_SHM
        segments = [body, *buffers]
    regions = [shared_region(segment) for segment in segments]
    shared_keys = list(dict.fromkeys(r[0] for r in regions if r is not None))[:_MAX_FDS]
    regions = [r if r is not None and r[0] in shared_keys else None for r in regions]
    copies = any(r is None for r in regions)
    table, offset = [], 0
    for segment, region in zip(segments, regions, strict=True):
        if region is None:  # copied into the message's own memfd, descriptor 0
            table.append((0, offset, segment.nbytes))
            offset += -(-segment.nbytes // _ALIGN) * _ALIGN
        else:
            table.append((copies + shared_keys.index(region[0]), region[1], segment.nbytes))
    fds: list[int] = []
    try:
        if copies:
            fds.append(os.memfd_create("vidpar-rpc", os.MFD_CLOEXEC))
            os.ftruncate(fds[0], max(offset, 1))
            for (_, start, _), segment, region in zip(table, segments, regions, strict=True):
                if region is None:
                    _write_all(fds[0], segment, start)
        fds += [os.dup(shared_descriptor(key)) for key in shared_keys]
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    header = [bytes([flags]), _COUNT.pack(len(fds)), _COUNT.pack(len(table))]
    header += [_SEGMENT.pack(*place) for place in table]
    if not flags & _FLAG_BODY_IN_SHM:
        header.append(body)
    last_times["encode_end"] = time.perf_counter()
    return b"".join(header), fds


def _recv_fds(sock: socket.socket, count: int) -> list[int]:
    _, fds, msg_flags, _ = socket.recv_fds(sock, 1, count)
    if msg_flags & socket.MSG_CTRUNC or len(fds) != count:
        for fd in fds:
            os.close(fd)
        if not fds:
            raise EOFError("the connection closed while passing shared memory")
        raise OSError("shared memory descriptors were truncated in transit")
    return fds


def decode(frame: bytes, sock: socket.socket) -> Message:
    """Inverse of :func:`encode`; reads the descriptors from ``sock`` when the frame says so.

    Shared memory is mapped copy-on-write: tensors are views of it (no copy), writes to
    them stay private to this process, and the memory is freed with the last view.
    """
    last_times["decode_start"] = time.perf_counter()
    view = memoryview(frame)
    flags = view[0]
    if not flags & _FLAG_FD:
        message = _message(pickle.loads(view[1:]))
        last_times["decode_end"] = time.perf_counter()
        return message
    (num_fds,) = _COUNT.unpack_from(view, 1)
    (count,) = _COUNT.unpack_from(view, 5)
    table = [_SEGMENT.unpack_from(view, 9 + i * _SEGMENT.size) for i in range(count)]
    fds = _recv_fds(sock, num_fds)
    memories = []
    try:
        for index, fd in enumerate(fds):
            size = max((start + n for i, start, n in table if i == index), default=1)
            shm = mmap.mmap(
                fd, max(size, 1), flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE
            )
            memories.append(memoryview(shm))
    finally:
        for fd in fds:
            os.close(fd)
    segments = [memories[i][start : start + n] for i, start, n in table]
    in_shm = flags & _FLAG_BODY_IN_SHM
    body = segments.pop(0) if in_shm else view[9 + count * _SEGMENT.size :]
    message = _message(pickle.loads(body, buffers=segments))
    last_times["decode_end"] = time.perf_counter()
    return message


def _message(tagged: tuple) -> Message:
    """The message of a decoded ``(tag, *fields)`` tuple."""
    return tuple.__new__(MESSAGES[tagged[0]], tagged[1:])


def close_all(fds: list[int]) -> None:
    """Close the descriptors :func:`encode` returned."""
    for fd in fds:
        os.close(fd)


class Channel:
    """One end of a control connection: frames over the pipe, bulk data over memfds."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        # A second handle on the same Unix socket, for passing descriptors.
        self.sock = socket.socket(fileno=os.dup(conn.fileno()))

    def fileno(self) -> int:
        return self.conn.fileno()

    def send_encoded(self, frame: bytes, fds: list[int]) -> None:
        """Send a frame made by :func:`encode` (the caller still owns and closes ``fds``)."""
        self.conn.send_bytes(frame)
        if fds:
            socket.send_fds(self.sock, [b"\x00"], fds)

    def send(self, message: Message) -> None:
        frame, fds = encode(message)
        try:
            self.send_encoded(frame, fds)
        finally:
            close_all(fds)

    def recv(self) -> Message:
        """The next message; ``EOFError`` when the other end has gone."""
        return decode(self.conn.recv_bytes(), self.sock)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
        with contextlib.suppress(OSError):
            self.conn.close()
