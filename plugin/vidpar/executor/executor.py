"""The Executor: one Worker process per rank, RPCs to all (or some) of them, and no orphans.

The parent keeps one duplex pipe per worker. A call encodes its request once
(:func:`~vidpar.executor.wire.encode`), writes the same frame to every chosen worker, then
waits with ``poll`` on the chosen workers' pipes together with *every* worker's process
sentinel, so a worker that dies is noticed at once even while a call is in flight. Failures
never leave processes behind: a dead worker, a timeout, a stuck rank after an error,
``KeyboardInterrupt`` in the caller, ``shutdown()``, garbage collection and interpreter exit
all stop every worker (politely where they can still listen, by ``SIGKILL`` otherwise).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import multiprocessing as mp
import os
import pickle
import select
import signal
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from multiprocessing.connection import wait
from typing import Any

import torch

from vidpar.config import ParallelConfig
from vidpar.executor.wire import Channel, decode, describe_exception, encode
from vidpar.executor.worker import Worker, WorkerSpec, worker_environment, worker_main

logger = logging.getLogger(__name__)

#: Time workers get to leave on their own at ``shutdown()`` before they are killed.
SHUTDOWN_GRACE_S = 10.0
_ENV_LOCK = threading.Lock()
_STARTUP_HINT = (
    " (its output above says why; a script that starts an Executor needs an "
    "`if __name__ == '__main__':` guard)"
)


class ExecutorError(RuntimeError):
    """Base class of the Executor's errors."""


class RemoteError(ExecutorError):
    """An exception raised inside a worker.

    ``rank``, ``exc_type`` (the exception's type name), ``remote_traceback`` (its formatted
    traceback), ``exception`` (the original exception when it could be unpickled here, else
    ``None``) and ``errors`` (every failing rank's :class:`RemoteError` of the same call).
    """

    def __init__(
        self,
        rank: int,
        exc_type: str,
        message: str,
        remote_traceback: str,
        exception: BaseException | None = None,
        note: str = "",
    ) -> None:
        self.rank = rank
        self.exc_type = exc_type
        self.message = message
        self.remote_traceback = remote_traceback
        self.exception = exception
        self.note = note
        self.errors: dict[int, RemoteError] = {rank: self}
        text = f"rank {rank} raised {exc_type}: {message}"
        if note:
            text += f"\n{note}"
        super().__init__(f"{text}\n--- remote traceback (rank {rank}) ---\n{remote_traceback}")

    def __reduce__(self):
        return (
            type(self),
            (self.rank, self.exc_type, self.message, self.remote_traceback, None, self.note),
        )


class WorkerDiedError(ExecutorError):
    """A worker process ended unexpectedly; the Executor has stopped the others."""

    def __init__(self, rank: int, exitcode: int | None, detail: str = "") -> None:
        self.rank = rank
        self.exitcode = exitcode
        self.detail = detail
        super().__init__(_death_message(rank, exitcode, detail))

    def __reduce__(self):
        return (type(self), (self.rank, self.exitcode, self.detail))


class RpcTimeoutError(ExecutorError, TimeoutError):
    """Some workers did not answer in time; the Executor has been shut down."""

    def __init__(self, ranks: Sequence[int], timeout: float, what: str) -> None:
        self.ranks = list(ranks)
        self.timeout = timeout
        self.what = what
        super().__init__(
            f"{what}: ranks {self.ranks} did not answer within {timeout:g} s; they are "
            "considered stuck and every worker has been stopped"
        )

    def __reduce__(self):
        return (type(self), (self.ranks, self.timeout, self.what))


def _death_message(rank: int, exitcode: int | None, detail: str) -> str:
    if exitcode is None:
        how = "its connection closed"
    elif exitcode < 0:
        name = signal.Signals(-exitcode).name if -exitcode in signal.valid_signals() else "?"
        how = f"killed by signal {-exitcode} ({name})"
        if -exitcode == signal.SIGKILL:
            how += "; out of memory, or killed by hand?"
    else:
        how = f"exit code {exitcode}"
    text = f"worker rank {rank} died ({how})"
    return f"{text} {detail}" if detail else text


def _resolve_devices(devices: str | Sequence[str] | None, world_size: int) -> list[str]:
    if devices is None:
        devices = "auto"
    if isinstance(devices, str):
        if devices == "auto":
            devices = "cuda" if torch.cuda.is_available() else "cpu"
        if devices == "cpu":
            return ["cpu"] * world_size
        if devices == "cuda":
            count = torch.cuda.device_count()
            if count < world_size:
                raise ValueError(
                    f"world size {world_size} needs {world_size} GPUs, but {count} are "
                    "visible; pass devices='cpu' or a list of devices"
                )
            return [f"cuda:{i}" for i in range(world_size)]
        raise ValueError(f"devices must be 'auto', 'cpu', 'cuda' or a list, got {devices!r}")
    devices = [str(torch.device(d)) for d in devices]
    if len(devices) != world_size:
        raise ValueError(f"{len(devices)} devices given for a world of size {world_size}")
    return devices


@contextlib.contextmanager
def _spawn_environment(env: dict[str, str]):
    """``os.environ`` updated while a child is spawned (spawn copies it at exec time), so
    variables read when libraries load (``OMP_NUM_THREADS``...) take effect."""
    with _ENV_LOCK:
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            yield
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def _descendants(procs: Sequence[mp.process.BaseProcess]) -> list[int]:
    """Pids of every process below ``procs`` (they would outlive a SIGKILLed worker)."""
    try:
        import psutil
    except ImportError:
        return []
    pids = []
    for proc in procs:
        with contextlib.suppress(psutil.Error, ValueError):
            pids += [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    return pids


class _Processes:
    """The worker processes and their channels; knows how to stop them. It holds no
    reference to the Executor, so it can serve as the Executor's finaliser."""

    def __init__(self) -> None:
        self.procs: list[mp.process.BaseProcess] = []
        self.channels: list[Channel] = []
        self.closed = False
        self._lock = threading.Lock()
        self._reap_lock = threading.Lock()

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def stop(self, grace: float = SHUTDOWN_GRACE_S) -> None:
        """Ask every worker to leave, wait up to ``grace`` s, then kill what remains.
        Idempotent."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
        atexit.unregister(self.stop)
        if grace > 0:
            frame, fd = encode((0, "shutdown", (), {}))
            for proc, channel in zip(self.procs, self.channels, strict=True):
                if proc.is_alive():
                    with contextlib.suppress(OSError, ValueError):
                        channel.send_encoded(frame, fd)
        self._reap(grace)

    def kill(self) -> None:
        """Stop every worker now (SIGKILL). Idempotent."""
        with self._lock:
            if self.closed and not self.procs:
                return
            self.closed = True
        atexit.unregister(self.stop)
        self._reap(0.0)

    def _reap(self, grace: float) -> None:
        with self._reap_lock:
            self._reap_locked(grace)

    def _reap_locked(self, grace: float) -> None:
        deadline = time.monotonic() + grace
        alive = [p for p in self.procs if p.exitcode is None]
        while alive and grace > 0:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            wait([p.sentinel for p in alive], timeout=remaining)
            alive = [p for p in alive if p.exitcode is None]
        for pid in _descendants(alive):  # e.g. data loader processes of a killed worker
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        for proc in alive:
            with contextlib.suppress(OSError, ValueError):
                proc.kill()
        for proc in self.procs:
            proc.join(timeout=30)
            if proc.exitcode is None:  # cannot happen after SIGKILL, but never hang here
                logger.error("worker pid %s did not exit after SIGKILL", proc.pid)
        for channel in self.channels:
            channel.close()
        for proc in self.procs:
            with contextlib.suppress(ValueError):
                proc.close()
        self.procs, self.channels = [], []


class Executor:
    """Runs one :class:`~vidpar.executor.Worker` process per rank of ``config``.

    Args:
        config: the parallel layout; ``config.world_size`` workers are started.
        worker_factory: ``worker_factory(worker)`` builds the payload (``worker.model``) in
            each worker after the parallel state is set up; must be picklable (a
            module-level function or class). ``None``: no payload.
        devices: ``"auto"`` (``cuda:i`` per rank when GPUs exist, else CPU), ``"cpu"``,
            ``"cuda"`` or one device string per rank.
        env: extra environment variables for every worker (set before it starts).
        init_distributed: join torch.distributed and build the layout's
            :class:`~vidpar.distributed.ParallelState` in each worker (gloo on CPU, NCCL on
            CUDA). ``False``: only export ``MASTER_ADDR``, ``MASTER_PORT`` (the Executor's
            store, which ``env://`` joins as a client), ``RANK``, ``LOCAL_RANK``,
            ``WORLD_SIZE`` and set the device, for code that joins torch.distributed itself.
        communicator: passed to ``initialize_model_parallel``.
        dist_timeout_s: torch.distributed's collective timeout in the workers (``None``:
            torch's default).
        worker_cls: a :class:`Worker` subclass (module-level) with more RPCs.
        startup_timeout: seconds to wait for every worker to report ready.
        error_grace_s: once a rank has raised, seconds the other ranks of the call get to
            answer; ranks still busy after that are taken as stuck (e.g. in a collective
            with the failed rank) and the Executor is shut down.
        master_addr: rendezvous host.

    Start-up failures raise :class:`RemoteError` (the failing rank's traceback),
    :class:`WorkerDiedError` or :class:`RpcTimeoutError` and leave no process behind. Unless
    ``OMP_NUM_THREADS`` is set, each worker gets ``cpu_count // world_size`` threads.
    """

    def __init__(
        self,
        config: ParallelConfig,
        worker_factory: Callable[[Worker], Any] | None = None,
        devices: str | Sequence[str] | None = "auto",
        env: dict[str, str] | None = None,
        init_distributed: bool = True,
        communicator: str = "auto",
        *,
        worker_cls: type[Worker] = Worker,
        startup_timeout: float = 300.0,
        error_grace_s: float = 30.0,
        master_addr: str = "127.0.0.1",
        dist_timeout_s: float | None = None,
    ) -> None:
        self.config = config
        self.dist_timeout_s = dist_timeout_s
        self.world_size = config.world_size
        self.devices = _resolve_devices(devices, self.world_size)
        self.init_distributed = init_distributed
        self.error_grace_s = error_grace_s
        self._env = {str(k): str(v) for k, v in (env or {}).items()}
        if "OMP_NUM_THREADS" not in os.environ and "OMP_NUM_THREADS" not in self._env:
            self._env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // self.world_size))
        self.startup_timeout = startup_timeout
        self.pids: list[int] = []
        self._lock = threading.RLock()
        self._seq = 0
        self._sentinel_ranks: dict[int, int] = {}
        self._workers = _Processes()
        atexit.register(self._workers.stop)
        # Stops the workers if the Executor is garbage-collected; at interpreter exit the
        # atexit hook above runs first (before multiprocessing joins its children).
        self._finalizer = weakref.finalize(self, self._workers.stop)
        self._finalizer.atexit = False
        try:
            self._start(worker_cls, worker_factory, communicator, master_addr)
        except BaseException:
            self._finalizer.detach()
            raise

    # Start-up ------------------------------------------------------------------------

    def _start(
        self,
        worker_cls: type[Worker],
        worker_factory: Callable[[Worker], Any] | None,
        communicator: str,
        master_addr: str,
    ) -> None:
        ctx = mp.get_context("spawn")
        # The rendezvous store runs here for the Executor's whole life: the OS picks its
        # port, so no worker can lose a race for one.
        self._store = torch.distributed.TCPStore(
            master_addr, 0, is_master=True, wait_for_workers=False
        )
        main_thread = threading.current_thread() is threading.main_thread()
        workers = self._workers
        try:
            for rank, device in enumerate(self.devices):
                spec = WorkerSpec(
                    rank=rank,
                    local_rank=rank,
                    world_size=self.world_size,
                    device=device,
                    config=self.config,
                    store_host=master_addr,
                    store_port=self._store.port,
                    init_distributed=self.init_distributed,
                    communicator=communicator,
                    timeout_s=self.dist_timeout_s,
                    env=self._env,
                    parent_pid=os.getpid(),
                    # The death signal fires when the spawning *thread* ends: only trust
                    # the main thread; elsewhere the worker's watchdog does the job.
                    use_death_signal=main_thread,
                )
                parent_end, child_end = ctx.Pipe(duplex=True)
                proc = ctx.Process(
                    target=worker_main,
                    args=(spec, child_end, worker_cls, worker_factory),
                    name=f"vidpar-worker-{rank}",
                    daemon=False,  # workers may start processes of their own (data loaders)
                )
                with _spawn_environment(worker_environment(spec)):
                    proc.start()
                child_end.close()
                workers.procs.append(proc)
                workers.channels.append(Channel(parent_end))
            self._sentinel_ranks = {p.sentinel: r for r, p in enumerate(workers.procs)}
            # One failed rank fails the start at once: the others may wait for it forever.
            everyone = list(range(self.world_size))
            replies = self._gather(everyone, self.startup_timeout, "start-up", error_grace=0.0)
        except BaseException:
            workers.kill()
            raise
        failures = {r: m for r, m in replies.items() if m[0] == "error"}
        if failures:
            workers.kill()
            raise self._remote_error(failures, "failed to start")
        self.pids = [m[2]["pid"] for _, m in sorted(replies.items())]

    # Calls ---------------------------------------------------------------------------

    def collective_rpc(
        self,
        method: str | Callable[..., Any],
        *args: Any,
        ranks: Iterable[int] | None = None,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> list[Any]:
        """Run ``method`` on the workers; their results in rank order.

        ``method`` is a :class:`Worker` method name or a picklable callable called as
        ``method(worker, *args, **kwargs)``. ``ranks`` chooses some workers (results come
        in ascending rank order). Tensors cross as CPU tensors through shared memory.

        Raises :class:`RemoteError` when a worker raised (the Executor stays usable when
        every chosen rank answered), :class:`WorkerDiedError` when a worker died and
        :class:`RpcTimeoutError` (a ``TimeoutError``) when ranks did not answer within
        ``timeout`` seconds; after those two the Executor is shut down.
        """
        targets = self._targets(ranks)
        what = method if isinstance(method, str) else getattr(method, "__qualname__", "callable")
        what = f"collective_rpc({what!r})"
        if method == "shutdown":
            self.shutdown()
            return [None] * len(targets)
        with self._lock:
            self._check_open()
            self._seq += 1
            frame, fd = encode((self._seq, method, args, kwargs))  # nothing sent if this fails
            try:
                channels = self._workers.channels
                for rank in targets:
                    try:
                        channels[rank].send_encoded(frame, fd)
                    except OSError as exc:
                        self._died(rank, f"while {what} was being sent ({exc})")
            except BaseException:
                self._workers.kill()
                raise
            finally:
                if fd is not None:
                    os.close(fd)
            try:
                replies = self._gather(targets, timeout, what, seq=self._seq)
            except (ExecutorError, TimeoutError):
                raise
            except BaseException:  # e.g. KeyboardInterrupt: replies are pending, so stop
                self._workers.kill()
                raise
        failures = {r: m for r, m in replies.items() if m[0] == "error"}
        if failures:
            raise self._remote_error(failures, f"in {what}")
        return [replies[r][2] for r in targets]

    def _targets(self, ranks: Iterable[int] | None) -> list[int]:
        if ranks is None:
            return list(range(self.world_size))
        given = list(ranks)
        if len(set(given)) != len(given) or any(
            not isinstance(r, int) or not 0 <= r < self.world_size for r in given
        ):
            raise ValueError(
                f"ranks must be distinct integers in [0, {self.world_size}), got {given}"
            )
        return sorted(given)

    def _check_open(self) -> None:
        if self._workers.closed:
            raise ExecutorError("the Executor has been shut down")

    def _gather(
        self,
        ranks: list[int],
        timeout: float | None,
        what: str,
        error_grace: float | None = None,
        seq: int = -1,
    ) -> dict[int, tuple]:
        """One reply from each of ``ranks``, watching every worker's sentinel meanwhile.

        After the first error reply the others get ``error_grace`` s (default
        ``self.error_grace_s``); if some are still silent then, every worker is stopped.
        """
        error_grace = self.error_grace_s if error_grace is None else error_grace
        channels = self._workers.channels
        pending = {channels[r].fileno(): r for r in ranks}
        sentinels = self._sentinel_ranks
        poller = select.poll()
        for fd in (*pending, *sentinels):
            poller.register(fd, select.POLLIN)
        replies: dict[int, tuple] = {}
        deadline = None if timeout is None else time.monotonic() + timeout
        error_deadline = None
        while pending:
            limits = [d for d in (deadline, error_deadline) if d is not None]
            wait_ms = -1
            if limits:
                remaining = min(limits) - time.monotonic()
                if remaining <= 0:
                    break
                wait_ms = max(1, int(remaining * 1000) + 1)
            for fd, _ in poller.poll(wait_ms):
                if fd in sentinels:
                    hint = _STARTUP_HINT if what == "start-up" else ""
                    self._died(sentinels[fd], f"during {what}{hint}")
                rank = pending.pop(fd, None)
                if rank is None:
                    continue
                poller.unregister(fd)
                replies[rank] = reply = self._receive(rank, what)
                if reply[1] not in (seq, -1):  # cannot happen unless the protocol broke
                    self._workers.kill()
                    raise ExecutorError(
                        f"rank {rank} answered request {reply[1]} during {what} (request "
                        f"{seq}); every worker has been stopped"
                    )
                if reply[0] == "error" and error_deadline is None:
                    error_deadline = time.monotonic() + error_grace
        if pending:
            missing = sorted(pending.values())
            self._workers.kill()
            failures = {r: m for r, m in replies.items() if m[0] == "error"}
            if failures:
                if error_grace > 0:
                    note = (
                        f"ranks {missing} were still busy {error_grace:g} s later (stuck "
                        "waiting for the failed rank?)"
                    )
                else:
                    note = f"ranks {missing} had not answered yet"
                raise self._remote_error(
                    failures, f"in {what}; {note}, so every worker was stopped"
                )
            raise RpcTimeoutError(missing, timeout, what)
        return replies

    def _receive(self, rank: int, what: str) -> tuple:
        channel = self._workers.channels[rank]
        try:
            frame = channel.conn.recv_bytes()
        except (EOFError, OSError):
            self._died(rank, f"during {what}")
        try:
            return decode(frame, channel.sock)
        except (EOFError, ConnectionError):
            self._died(rank, f"during {what}")
        except Exception as exc:  # e.g. the result's class cannot be imported here
            name, message, text, _ = describe_exception(exc)
            text = f"(the reply arrived but could not be unpickled in the caller)\n{text}"
            return ("error", -1, name, message, text, None)

    def _died(self, rank: int, detail: str) -> None:
        """Stop every worker and raise :class:`WorkerDiedError` (or a shut-down error)."""
        closing = self._workers.closed
        proc = self._workers.procs[rank] if rank < len(self._workers.procs) else None
        if proc is not None:
            proc.join(timeout=1.0)
        exitcode = proc.exitcode if proc is not None else None
        self._workers.kill()
        if closing:
            raise ExecutorError(f"the Executor was shut down {detail}")
        raise WorkerDiedError(rank, exitcode, f"{detail}; every other worker has been stopped")

    def _remote_error(self, failures: dict[int, tuple], context: str) -> RemoteError:
        errors = {}
        for rank, (_, _, exc_type, message, text, pickled) in sorted(failures.items()):
            exception = None
            if pickled is not None:
                with contextlib.suppress(Exception):
                    exception = pickle.loads(pickled)
            errors[rank] = RemoteError(rank, exc_type, message, text, exception, context)
        first = next(iter(errors.values()))
        if len(errors) > 1:
            others = ", ".join(f"{r} ({e.exc_type})" for r, e in errors.items() if e is not first)
            first = RemoteError(
                first.rank,
                first.exc_type,
                first.message,
                first.remote_traceback,
                first.exception,
                f"{context}; ranks {others} failed too (see .errors)",
            )
        first.errors = errors
        return first

    # Life cycle ----------------------------------------------------------------------

    @property
    def is_alive(self) -> bool:
        """Whether the Executor is open and every worker process still runs."""
        return not self._workers.closed and all(p.is_alive() for p in self._workers.procs)

    def shutdown(self, grace: float = SHUTDOWN_GRACE_S) -> None:
        """Stop every worker (politely, then by force after ``grace`` s). Idempotent; also
        runs at interpreter exit and when the Executor is garbage-collected."""
        self._workers.stop(grace)
        self._finalizer.detach()

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    def __repr__(self) -> str:
        state = "closed" if self._workers.closed else f"pids={self._workers.pids()}"
        return f"Executor({self.config.describe()}, devices={self.devices}, {state})"
