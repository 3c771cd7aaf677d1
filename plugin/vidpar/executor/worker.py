"""The worker side of the Executor: one process per device, serving RPCs in a tight loop.

A worker is started by :class:`~vidpar.executor.Executor` with the spawn start method. It
guards against becoming an orphan (``PR_SET_PDEATHSIG`` plus a watchdog thread), sets its
device, joins the parallel layout, builds its payload through ``worker_factory(worker)`` and
then answers requests until told to stop. The RPC runs in the main thread that read the
request: no per-call thread handoff.

Wire format (both directions): every message is one ``Connection.send_bytes`` frame. Its
first byte holds flags. Without ``_FLAG_FD`` the rest is a pickle. With it, a segment table
follows and one file descriptor (a ``memfd``) is passed right after the frame over the same
Unix socket; large buffers (tensors, numpy arrays; and the pickle itself when it is large)
live in that shared memory, written once by the sender and mapped copy-on-write by each
receiver. A request broadcast to N workers is therefore encoded once and the same bytes and
the same memory go to every worker. Nothing is named in the file system, so nothing leaks
when a process is killed. (Without ``memfd_create``, i.e. off Linux, everything goes
through the pipe.)
"""

from __future__ import annotations

import contextlib
import copyreg
import ctypes
import io
import logging
import math
import mmap
import os
import pickle
import select
import signal
import socket
import struct
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, ClassVar

import torch

from vidpar.config import ParallelConfig

logger = logging.getLogger(__name__)

# Wire format -------------------------------------------------------------------------

#: Buffers of at least this many bytes travel through shared memory, not the pipe.
OOB_MIN_BYTES = 1 << 16
#: Pickles longer than this travel through shared memory too, so pipe frames stay small.
INLINE_MAX_BYTES = 1 << 16
_ALIGN = 64
_FLAG_FD = 1
_FLAG_BODY_IN_SHM = 2
_COUNT = struct.Struct("<I")
_SEGMENT = struct.Struct("<QQ")
_HAS_MEMFD = hasattr(os, "memfd_create") and sys.platform.startswith("linux")


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


def encode(obj: Any) -> tuple[bytes, int | None]:
    """One frame for ``obj`` and, when it carries bulk data, the memfd that holds it.

    The caller sends the frame, then the descriptor (:meth:`Channel.send_encoded`) to as
    many receivers as it likes, and closes the descriptor afterwards.

    Tensors cross as contiguous CPU tensors holding just their own elements (a slice of a
    big tensor does not drag the whole storage along); the same tensor object twice is
    sent once, but distinct tensors that view one storage arrive as independent copies.
    """
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
        out, protocol=pickle.HIGHEST_PROTOCOL, buffer_callback=out_of_band if _HAS_MEMFD else None
    ).dump(obj)
    if not buffers and (out.tell() <= INLINE_MAX_BYTES + 1 or not _HAS_MEMFD):
        return out.getvalue(), None

    flags = _FLAG_FD
    body = out.getbuffer()[1:]
    segments = buffers
    if body.nbytes > INLINE_MAX_BYTES:
        flags |= _FLAG_BODY_IN_SHM
        segments = [body, *buffers]
    table, offset = [], 0
    for segment in segments:
        table.append((offset, segment.nbytes))
        offset += -(-segment.nbytes // _ALIGN) * _ALIGN
    fd = os.memfd_create("vidpar-rpc", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, max(offset, 1))
        for (start, _), segment in zip(table, segments, strict=True):
            _write_all(fd, segment, start)
    except BaseException:
        os.close(fd)
        raise
    header = [bytes([flags]), _COUNT.pack(len(table))]
    header += [_SEGMENT.pack(start, size) for start, size in table]
    if not flags & _FLAG_BODY_IN_SHM:
        header.append(body)
    return b"".join(header), fd


def _recv_fd(sock: socket.socket) -> int:
    _, fds, msg_flags, _ = socket.recv_fds(sock, 1, 4)
    if not fds:
        raise EOFError("the connection closed while passing shared memory")
    for extra in fds[1:]:
        os.close(extra)
    if msg_flags & socket.MSG_CTRUNC:
        os.close(fds[0])
        raise OSError("shared memory descriptor was truncated in transit")
    return fds[0]


def decode(frame: bytes, sock: socket.socket) -> Any:
    """Inverse of :func:`encode`; reads the descriptor from ``sock`` when the frame says so.

    Shared memory is mapped copy-on-write: tensors are views of it (no copy), writes to
    them stay private to this process, and the memory is freed with the last view.
    """
    view = memoryview(frame)
    flags = view[0]
    if not flags & _FLAG_FD:
        return pickle.loads(view[1:])
    fd = _recv_fd(sock)
    try:
        (count,) = _COUNT.unpack_from(view, 1)
        table = [_SEGMENT.unpack_from(view, 5 + i * _SEGMENT.size) for i in range(count)]
        size = max((start + length for start, length in table), default=1)
        shm = mmap.mmap(
            fd, max(size, 1), flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE
        )
    finally:
        os.close(fd)
    memory = memoryview(shm)
    segments = [memory[start : start + length] for start, length in table]
    in_shm = flags & _FLAG_BODY_IN_SHM
    body = segments.pop(0) if in_shm else view[5 + count * _SEGMENT.size :]
    return pickle.loads(body, buffers=segments)


class Channel:
    """One end of a control connection: frames over the pipe, bulk data over memfds."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        # A second handle on the same Unix socket, for passing descriptors.
        self.sock = socket.socket(fileno=os.dup(conn.fileno()))

    def fileno(self) -> int:
        return self.conn.fileno()

    def send_encoded(self, frame: bytes, fd: int | None) -> None:
        """Send a frame made by :func:`encode` (the caller still owns and closes ``fd``)."""
        self.conn.send_bytes(frame)
        if fd is not None:
            socket.send_fds(self.sock, [b"\x00"], [fd])

    def send(self, obj: Any) -> None:
        frame, fd = encode(obj)
        try:
            self.send_encoded(frame, fd)
        finally:
            if fd is not None:
                os.close(fd)

    def recv(self) -> Any:
        """The next object; ``EOFError`` when the other end has gone."""
        return decode(self.conn.recv_bytes(), self.sock)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
        with contextlib.suppress(OSError):
            self.conn.close()


def describe_exception(exc: BaseException) -> tuple[str, str, str, bytes | None]:
    """``(type name, message, traceback text, pickled exception or None)``."""
    try:
        pickled = pickle.dumps(exc, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:
        pickled = None
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return type(exc).__name__, str(exc), text, pickled


# Orphan protection ---------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1
#: After the control connection hangs up while the parent lives, exit after this long.
HANGUP_GRACE_S = 30.0


def _set_parent_death_signal() -> bool:
    """Ask Linux to SIGKILL this process when the thread that spawned it exits."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent_pid: int, control_fd: int) -> None:
    """Exit at once when the parent is gone (the fallback to the death signal).

    Wakes when the control socket hangs up (without touching data the main thread
    reads) or every second, and compares the parent pid.
    """
    poller = select.poll()
    poller.register(control_fd, getattr(select, "POLLRDHUP", 0))
    hung_up_at: float | None = None
    while True:
        events = poller.poll(50 if hung_up_at is not None else 1000)
        if os.getppid() != parent_pid:
            os._exit(1)
        if events and hung_up_at is None:
            hung_up_at = time.monotonic()
            poller.unregister(control_fd)
            os.close(control_fd)
        if hung_up_at is not None and time.monotonic() - hung_up_at > HANGUP_GRACE_S:
            os._exit(1)


def _guard_against_orphaning(parent_pid: int, conn: Connection, use_death_signal: bool) -> None:
    if use_death_signal:
        _set_parent_death_signal()
    if os.getppid() != parent_pid:  # the parent died before the death signal was armed
        os._exit(1)
    watchdog = threading.Thread(
        target=_watch_parent,
        args=(parent_pid, os.dup(conn.fileno())),
        name="vidpar-parent-watchdog",
        daemon=True,
    )
    watchdog.start()


# The worker ---------------------------------------------------------------------------


@dataclass
class WorkerSpec:
    """Everything a worker process is started with."""

    rank: int
    local_rank: int
    world_size: int
    device: str
    config: ParallelConfig
    master_addr: str
    master_port: int
    init_distributed: bool = True
    communicator: str = "auto"
    env: dict[str, str] = field(default_factory=dict)
    parent_pid: int = 0
    use_death_signal: bool = True


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


class Worker:
    """One process of the world, owning one device and a payload (usually a model).

    Attributes: ``rank``, ``local_rank``, ``world_size``, ``device`` (a ``torch.device``),
    ``config`` (the :class:`ParallelConfig`, resolved against the world size once the
    layout is initialised) and ``model`` (what ``worker_factory(worker)`` returned, or
    ``None``). Public methods are RPCs: ``executor.collective_rpc("name", ...)`` calls them
    on every worker. Subclass it (a module-level class, passed as ``worker_cls``) to add
    RPCs. LoRA adapters (``set_lora_adapter``, ``merge_lora``, ``unmerge_lora``) work on
    any payload whose sharded weights follow the ``tensor_parallel_dim`` contract.
    """

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.rank = spec.rank
        self.local_rank = spec.local_rank
        self.world_size = spec.world_size
        self.device = torch.device(spec.device)
        self.config = spec.config
        self.model: Any = None
        self._stopping = False
        self._owns_parallel_state = False

    # Start-up, called once by the worker process in this order ------------------------

    def init_device(self) -> None:
        """Make ``self.device`` this process's current device."""
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)

    def init_parallel_state(self) -> None:
        """Join the torch.distributed world and build the layout's groups."""
        from vidpar.distributed import parallel_state as ps

        spec = self.spec
        ps.init_distributed_environment(
            world_size=spec.world_size,
            rank=spec.rank,
            local_rank=(self.device.index or 0) if self.device.type == "cuda" else spec.local_rank,
            init_method=f"tcp://{spec.master_addr}:{spec.master_port}",
            backend="nccl" if self.device.type == "cuda" else "gloo",
        )
        self._owns_parallel_state = True
        self.config = ps.initialize_model_parallel(spec.config, spec.communicator)

    def build(self, worker_factory: Callable[[Worker], Any] | None) -> None:
        """Build the payload through ``worker_factory(self)`` (``None``: no payload)."""
        self.model = None if worker_factory is None else worker_factory(self)

    # Built-in RPCs --------------------------------------------------------------------

    def ping(self) -> int:
        """Does nothing; returns this worker's rank (the round-trip benchmark)."""
        return self.rank

    def load_weights(self, path_or_state_dict: Any, **kwargs: Any) -> Any:
        """Load a full (unsharded) checkpoint into the payload, each rank keeping its own
        shards: a state dict, a ``.safetensors`` file or a torch checkpoint file (read with
        ``weights_only=True``). ``kwargs`` go to ``vidpar.nn.linear.load_full_weights``."""
        from vidpar.nn.linear import load_full_weights

        source = path_or_state_dict
        if isinstance(source, (str, os.PathLike)) and not os.fspath(source).endswith(
            ".safetensors"
        ):
            source = torch.load(source, map_location="cpu", weights_only=True)
        return load_full_weights(self._require_model(), source, **kwargs)

    def execute_forward(self, batch: Any) -> Any:
        """The payload called on ``batch`` under ``torch.no_grad``: a dict is keyword
        arguments, a tuple or list positional ones, anything else the single argument.
        Tensors are moved to this worker's device first."""
        model = self._require_model()
        batch = _to_device(batch, self.device)
        with torch.no_grad():
            if isinstance(batch, dict):
                return model(**batch)
            if isinstance(batch, (tuple, list)):
                return model(*batch)
            return model(batch)

    def shutdown(self) -> None:
        """Release the payload and the process groups; the event loop then ends."""
        self._stopping = True
        self.model = None
        if self._owns_parallel_state:
            from vidpar.distributed import parallel_state as ps

            self._owns_parallel_state = False
            with contextlib.suppress(Exception):
                ps.destroy_distributed_environment()

    # LoRA adapters (vidpar.nn.lora), kept per worker around its model ------------------

    def _lora(self) -> Any:
        """This worker's :class:`~vidpar.nn.lora.LoraManager`, created on first use (and
        again if the payload was replaced)."""
        from vidpar.nn.lora import LoraManager

        manager = getattr(self, "_lora_manager", None)
        if manager is None or manager.model is not self._require_model():
            manager = self._lora_manager = LoraManager(self.model)
        return manager

    def set_lora_adapter(self, name: str, path_or_state: Any) -> list[str]:
        """Load (or replace) the LoRA adapter ``name``: a dict of full factors
        ``"<weight>.lora_A"`` ``[r, in]``, ``"<weight>.lora_B"`` ``[out, r]`` and an optional
        ``"scale"``, or a ``.safetensors``/torch file of one. Returns the targeted weights."""
        return self._lora().set_adapter(name, path_or_state)

    def merge_lora(self, name: str | None = None) -> str:
        """Add adapter ``name`` (default: the only one set) into this rank's weight shards;
        returns its name."""
        return self._lora().merge(name)

    def unmerge_lora(self) -> str | None:
        """Undo :meth:`merge_lora` exactly; returns the adapter that was merged, if any."""
        return self._lora().unmerge()

    # Event loop -----------------------------------------------------------------------

    def _require_model(self) -> Any:
        if self.model is None:
            raise RuntimeError(
                f"rank {self.rank} has no payload: pass worker_factory to the Executor"
            )
        return self.model

    def serve(self, channel: Channel) -> None:
        """Answer requests ``(seq, method, args, kwargs)`` until shutdown or hang-up."""
        conn, sock = channel.conn, channel.sock
        while not self._stopping:
            try:
                frame = conn.recv_bytes()
            except (EOFError, OSError):
                break
            frame, fd = self._handle(frame, sock)
            try:
                channel.send_encoded(frame, fd)
            except OSError:
                break
            finally:
                if fd is not None:
                    os.close(fd)

    def _handle(self, frame: bytes, sock: socket.socket) -> tuple[bytes, int | None]:
        """Run one request; the encoded reply."""
        seq, method = -1, "?"
        try:
            seq, method, args, kwargs = decode(frame, sock)
            if isinstance(method, str):
                result = getattr(self, method)(*args, **kwargs)
            else:
                result = method(self, *args, **kwargs)
        except BaseException as exc:
            return encode(("error", seq, *describe_exception(exc)))
        del args, kwargs
        try:
            return encode(("ok", seq, result))
        except BaseException as exc:
            name = method if isinstance(method, str) else getattr(method, "__qualname__", method)
            error = pickle.PicklingError(f"the result of {name} could not be sent back: {exc!r}")
            error.__cause__ = exc
            return encode(("error", seq, *describe_exception(error)))


def worker_environment(spec: WorkerSpec) -> dict[str, str]:
    """The variables a worker runs with: the rendezvous, then the caller's ``env``."""
    env = {
        "MASTER_ADDR": spec.master_addr,
        "MASTER_PORT": str(spec.master_port),
        "RANK": str(spec.rank),
        "LOCAL_RANK": str(spec.local_rank),
        "WORLD_SIZE": str(spec.world_size),
        "LOCAL_WORLD_SIZE": str(spec.world_size),
    }
    if spec.device.startswith("cpu"):
        env["CUDA_VISIBLE_DEVICES"] = ""  # CPU workers must not create CUDA contexts
    env.update(spec.env)
    return env


def worker_main(
    spec: WorkerSpec,
    conn: Connection,
    worker_cls: type[Worker],
    worker_factory: Callable[[Worker], Any] | None,
) -> None:
    """Entry point of a worker process (the target the Executor spawns)."""
    _guard_against_orphaning(spec.parent_pid, conn, spec.use_death_signal)
    # Ctrl-C reaches the whole foreground process group: the parent handles it and stops us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ.update(worker_environment(spec))
    channel = Channel(conn)
    worker = None
    try:
        worker = worker_cls(spec)
        worker.init_device()
        if spec.init_distributed:
            worker.init_parallel_state()
        worker.build(worker_factory)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            channel.send(("error", -1, *describe_exception(exc)))
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    try:
        channel.send(("ready", -1, {"rank": spec.rank, "pid": os.getpid(), "device": spec.device}))
        worker.serve(channel)
    finally:
        if not worker._stopping:
            with contextlib.suppress(Exception):
                worker.shutdown()
        channel.close()
