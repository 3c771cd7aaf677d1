"""The worker side of the Executor: one process per device, serving RPCs in a tight loop.

A worker is started by :class:`~vidpar.executor.Executor`, forked from a server that has
torch loaded (:mod:`~vidpar.executor.start_method`). It takes on the caller's environment
and output, guards against becoming an orphan and leads a process group of its own
(:mod:`~vidpar.executor.orphans`), starts its heartbeat (:mod:`~vidpar.executor.liveness`),
sets its device,
joins the world through the Executor's rendezvous store, builds the layout's
:class:`~vidpar.distributed.ParallelState`, builds its payload through
``worker_factory(worker)`` and then answers requests (:mod:`~vidpar.executor.wire`) until
told to stop. The RPC runs in the main thread that read the request: no per-call thread
handoff. Only methods marked :func:`rpc` can be called by name.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from multiprocessing.connection import Connection
from typing import Any, TypeVar

import torch

from vidpar.config import ParallelConfig
from vidpar.executor import liveness
from vidpar.executor.orphans import guard_against_orphaning, kill_own_group, lead_own_group
from vidpar.executor.start_method import CallerState
from vidpar.executor.wire import (
    STARTUP_SEQ,
    Answer,
    Channel,
    ErrorReply,
    ExceptionInfo,
    Ready,
    Reply,
    Request,
    Shutdown,
    close_all,
    decode,
    encode,
)

_F = TypeVar("_F", bound=Callable[..., Any])
_RPC_MARK = "__vidpar_rpc__"


def rpc(method: _F) -> _F:
    """Mark a :class:`Worker` method as callable by name through
    :meth:`Executor.collective_rpc <vidpar.executor.Executor.collective_rpc>`."""
    setattr(method, _RPC_MARK, True)
    return method


def rpc_names(worker_cls: type) -> list[str]:
    """The RPCs a worker class offers."""
    return sorted(n for n in dir(worker_cls) if getattr(getattr(worker_cls, n), _RPC_MARK, False))


@dataclass(frozen=True)
class WorkerSpec:
    """What every worker of one Executor starts with, built once by the Executor (and its
    only copy): the layout ``parallel`` (resolved: its ``world_size`` workers run), rank
    ``r``'s device ``devices[r]``, the rendezvous store ``store_host:store_port`` (a
    TCPStore server held by the Executor's process), torch.distributed's collective
    ``dist_timeout`` (``None``: torch's default) and how a worker guards its life."""

    parallel: ParallelConfig
    devices: tuple[str, ...]
    store_host: str
    store_port: int
    init_distributed: bool = True
    communicator: str = "auto"
    dist_timeout: timedelta | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    parent_pid: int = 0
    use_death_signal: bool = True
    catch_sigterm: bool = False

    def __post_init__(self) -> None:
        if len(self.devices) != self.world_size:
            raise ValueError(
                f"{len(self.devices)} devices given for a world of size {self.world_size}"
            )
        if self.dist_timeout is not None and not isinstance(self.dist_timeout, timedelta):
            raise TypeError(
                f"dist_timeout must be a datetime.timedelta or None, got {self.dist_timeout!r}"
            )

    @property
    def world_size(self) -> int:
        return self.parallel.world_size


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


class Worker:
    """One process of the world, owning one device and a payload (usually a model).

    Attributes: ``spec`` (the :class:`WorkerSpec` of every worker), ``rank`` (its local
    rank too: the world is on one host), ``world_size``, ``device`` (a ``torch.device``),
    ``parallel`` (the :class:`ParallelConfig`), ``state`` (the
    :class:`~vidpar.distributed.ParallelState` once the layout is built) and ``model``
    (what ``worker_factory(worker)`` returned, or ``None``). Methods marked :func:`rpc`
    are what ``executor.collective_rpc("name", ...)`` calls; subclass it (a module-level
    class, passed as ``worker_cls``) to add RPCs, and extend :meth:`shutdown` to release
    more.
    """

    def __init__(self, spec: WorkerSpec, rank: int) -> None:
        self.spec = spec
        self.rank = rank
        self.device = torch.device(spec.devices[rank])
        self.state = None
        self.model: Any = None

    @property
    def world_size(self) -> int:
        return self.spec.world_size

    @property
    def parallel(self) -> ParallelConfig:
        """The layout (resolved: the one the state is built from)."""
        return self.spec.parallel

    # Start-up, called once by the worker process in this order ------------------------

    def init_device(self) -> None:
        """Make ``self.device`` this process's current device."""
        if self.device.type == "cuda":
            if torch.cuda._is_in_bad_fork():
                raise RuntimeError(
                    "CUDA was initialised in the fork server this worker was forked from (a "
                    "module it preloads used the GPU on import); VIDPAR_START_METHOD=spawn "
                    "starts workers afresh instead"
                )
            torch.cuda.set_device(self.device)

    def init_parallel_state(self) -> None:
        """Join the torch.distributed world through the Executor's store and build the
        layout's groups (the same road for training and inference)."""
        import torch.distributed as dist

        from vidpar.distributed import state as ps

        spec = self.spec
        store = dist.TCPStore(
            spec.store_host,
            spec.store_port,
            spec.world_size,
            is_master=False,
            timeout=spec.dist_timeout or timedelta(minutes=5),
        )
        ps.init_distributed_environment(
            world_size=spec.world_size,
            rank=self.rank,
            local_rank=(self.device.index or 0) if self.device.type == "cuda" else self.rank,
            backend="nccl" if self.device.type == "cuda" else "gloo",
            timeout=spec.dist_timeout,
            store=store,
        )
        self.state = ps.initialize_model_parallel(spec.parallel, spec.communicator)

    def build(self, worker_factory: Callable[[Worker], Any] | None) -> None:
        """Build the payload through ``worker_factory(self)`` (``None``: no payload)."""
        self.model = None if worker_factory is None else worker_factory(self)

    # Built-in RPCs --------------------------------------------------------------------

    @rpc
    def ping(self) -> int:
        """Does nothing; returns this worker's rank (the round-trip benchmark)."""
        return self.rank

    @rpc
    def load_weights(self, path_or_state_dict: Any, **kwargs: Any) -> Any:
        """Load a full (unsharded) checkpoint into the payload, each rank keeping its own
        shards: a state dict, a ``.safetensors`` file or a torch checkpoint file (read with
        ``weights_only=True``). ``kwargs`` go to
        :func:`vidpar.distributed.full_weights.load_full_weights`."""
        from vidpar.distributed.full_weights import load_full_weights

        source = path_or_state_dict
        if isinstance(source, str | os.PathLike) and not os.fspath(source).endswith(".safetensors"):
            source = torch.load(source, map_location="cpu", weights_only=True)
        return load_full_weights(self.require_model(), source, **kwargs)

    @rpc
    def execute_forward(self, batch: Any) -> Any:
        """The payload called on ``batch`` under ``torch.no_grad``: a dict is keyword
        arguments, a tuple or list positional ones, anything else the single argument.
        Tensors are moved to this worker's device first."""
        model = self.require_model()
        batch = _to_device(batch, self.device)
        with torch.no_grad():
            if isinstance(batch, dict):
                return model(**batch)
            if isinstance(batch, tuple | list):
                return model(*batch)
            return model(batch)

    # Shutdown ---------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Release the payload and the process groups (once, as the worker ends: after a
        :class:`~vidpar.executor.wire.Shutdown`, a hang-up or a failed start)."""
        self.model = None
        if self.state is not None:
            from vidpar.distributed import state as ps

            self.state = None
            with contextlib.suppress(Exception):
                ps.destroy_distributed_environment()

    # Event loop -----------------------------------------------------------------------

    def require_model(self) -> Any:
        """The payload; a clear error when the Executor was started without one."""
        if self.model is None:
            raise RuntimeError(
                f"rank {self.rank} has no payload: pass worker_factory to the Executor"
            )
        return self.model

    def serve(self, channel: Channel) -> None:
        """Answer each :class:`~vidpar.executor.wire.Request` until a
        :class:`~vidpar.executor.wire.Shutdown` or a hang-up."""
        try:
            while True:
                frame = channel.conn.recv_bytes()
                try:
                    request = decode(frame, channel.sock)
                except BaseException as exc:  # e.g. a callable not importable here
                    send_answer(channel, ErrorReply(None, ExceptionInfo.of(exc)))
                    continue
                if isinstance(request, Shutdown):
                    return
                name = request.name
                answer = self._run(request, name)
                del request  # its tensors are freed before the answer is encoded
                send_answer(channel, answer, name)
                del answer  # nor kept while waiting (a shared buffer in it, see wire)
        except (EOFError, OSError):  # the Executor hung up
            return

    def _resolve(self, method: str | Callable[..., Any]) -> Callable[..., Any]:
        if not isinstance(method, str):
            return lambda *args, **kwargs: method(self, *args, **kwargs)
        if not getattr(getattr(type(self), method, None), _RPC_MARK, False):
            raise AttributeError(
                f"{method!r} is not an RPC of {type(self).__name__}; its RPCs are "
                f"{', '.join(rpc_names(type(self)))} (mark new ones with @rpc), or pass a "
                "callable taking the worker"
            )
        return getattr(self, method)

    def _run(self, request: Request, name: str) -> Reply | ErrorReply:
        """Run one request (``name``: its method's); its answer."""
        liveness.begin_rpc(name)
        try:
            return Reply(
                request.seq, self._resolve(request.method)(*request.args, **request.kwargs)
            )
        except BaseException as exc:
            return ErrorReply(request.seq, ExceptionInfo.of(exc))
        finally:
            liveness.begin_rpc("")


def send_answer(channel: Channel, answer: Answer, method: str = "") -> None:
    """Send ``answer``; when the value that ``method`` returned cannot be pickled, the
    error that says so."""
    try:
        frame, fds = encode(answer)
    except BaseException as exc:
        what = f"the result of {method}" if method else "the answer"
        error = pickle.PicklingError(f"{what} could not be sent back: {exc!r}")
        error.__cause__ = exc
        frame, fds = encode(ErrorReply(answer.seq, ExceptionInfo.of(error)))
    try:
        channel.send_encoded(frame, fds)
    finally:
        close_all(fds)


def worker_environment(spec: WorkerSpec, rank: int) -> dict[str, str]:
    """The variables worker ``rank`` runs with: the rendezvous, then the caller's ``env``.

    ``MASTER_ADDR``/``MASTER_PORT`` name the Executor's store, which already runs: code
    that joins torch.distributed itself (``env://``) connects to it as a client
    (``TORCHELASTIC_USE_AGENT_STORE``), so no rank has to win a port.
    """
    env = {
        "MASTER_ADDR": spec.store_host,
        "MASTER_PORT": str(spec.store_port),
        "TORCHELASTIC_USE_AGENT_STORE": "True",
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(spec.world_size),
        "LOCAL_WORLD_SIZE": str(spec.world_size),
    }
    if spec.devices[rank].startswith("cpu"):
        env["CUDA_VISIBLE_DEVICES"] = ""  # CPU workers must not create CUDA contexts
    env.update(spec.env)
    return env


def worker_main(
    spec: WorkerSpec,
    rank: int,
    conn: Connection,
    link: liveness.LivenessLink,
    caller: CallerState,
    worker_cls: type[Worker],
    worker_factory: Callable[[Worker], Any] | None,
) -> None:
    """Entry point of worker ``rank``'s process (the target the Executor starts)."""
    caller.apply(worker_environment(spec, rank))
    guard_against_orphaning(spec.parent_pid, conn, spec.use_death_signal)
    lead_own_group()
    link.start()
    # Ctrl-C is the parent's to handle (it stops us), and SIGTERM too unless we catch it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if spec.catch_sigterm:
        liveness.catch_sigterm()
    channel = Channel(conn)
    worker = None
    try:
        worker = worker_cls(spec, rank)
        worker.init_device()
        if spec.init_distributed:
            worker.init_parallel_state()
        worker.build(worker_factory)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            send_answer(channel, ErrorReply(STARTUP_SEQ, ExceptionInfo.of(exc)))
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    try:
        send_answer(channel, Ready(rank, os.getpid(), str(worker.device)))
        worker.serve(channel)
    finally:
        with contextlib.suppress(Exception):
            worker.shutdown()
        channel.close()
        caller.finish()
        kill_own_group()  # what this worker started and left running
