"""The Executor: one Worker process per rank, RPCs to all (or some) of them, and no orphans.

The parent keeps one duplex pipe per worker. A call encodes its request once
(:func:`~vidpar.executor.wire.encode`), writes the same frame to every chosen worker, then
waits with ``poll`` on the chosen workers' pipes together with *every* worker's pidfd
(:mod:`~vidpar.executor.processes`), so a worker that dies is noticed at once even while a
call is in flight, and reads the workers' heartbeats (:mod:`~vidpar.executor.liveness`)
every second or so, so a worker that stops making progress is named (with its Python
stacks) within ``heartbeat_timeout_s``. Failures never leave processes behind: a dead or
stuck worker, a timeout, a rank still busy after another one raised, ``KeyboardInterrupt``
in the caller, ``shutdown()``, garbage collection and interpreter exit all stop every
worker and the processes they started (politely where they can still listen, by
``SIGKILL`` otherwise).
"""

from __future__ import annotations

import atexit
import logging
import os
import select
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NoReturn

from vidpar.config import ParallelConfig
from vidpar.executor.errors import (
    ExecutorError,
    RpcTimeoutError,
    WorkerDiedError,
    remote_error,
)
from vidpar.executor.liveness import Stall
from vidpar.executor.orphans import kill_group
from vidpar.executor.processes import SHUTDOWN_GRACE_S, WorkerProcesses, resolve_devices
from vidpar.executor.rendezvous import loopback_sockets_env, loopback_store
from vidpar.executor.wire import encode
from vidpar.executor.worker import Worker, WorkerSpec

logger = logging.getLogger(__name__)

#: Seconds the other ranks of a call get to answer once one rank has raised.
ERROR_GRACE_S = 1.5
#: Seconds without a heartbeat after which a worker that is not busy is stuck.
HEARTBEAT_TIMEOUT_S = 60.0
_STARTUP_HINT = (
    " (its output above says why; a script that starts an Executor needs an "
    "`if __name__ == '__main__':` guard)"
)


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
        master_addr: the loopback address the rendezvous store listens on (only there:
            no other host can reach it).
        heartbeat_timeout_s: a worker whose heartbeat thread has been silent this long
            during a call, and none of whose threads is running or waiting for a CPU, is
            stuck (stopped, blocked in the kernel or waiting with the GIL held), however
            little CPU the machine gives it: :class:`WorkerStuckError` names it, with its
            activity and Python stacks, and every worker is stopped. ``None``: never. Not
            applied during start-up (``startup_timeout`` is).
        catch_sigterm: workers turn ``SIGTERM`` into a stop request
            (:func:`vidpar.executor.liveness.stop_requested`) instead of dying, so a
            training loop can save and stop (SLURM signals every process of a job).

    Start-up failures raise :class:`RemoteError` (the failing rank's traceback),
    :class:`WorkerDiedError` or :class:`RpcTimeoutError` and leave no process behind. Unless
    ``OMP_NUM_THREADS`` is set, each worker gets ``cpu_count // world_size`` threads. Each
    worker leads a process group of its own: what it starts dies with it, and with this
    process. No other host can reach the world: the rendezvous store listens on
    ``master_addr`` and, unless ``GLOO_SOCKET_IFNAME``/``NCCL_SOCKET_IFNAME`` are set, gloo
    and NCCL on the loopback interface.
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
        error_grace_s: float = ERROR_GRACE_S,
        master_addr: str = "127.0.0.1",
        dist_timeout_s: float | None = None,
        heartbeat_timeout_s: float | None = HEARTBEAT_TIMEOUT_S,
        catch_sigterm: bool = False,
    ) -> None:
        self.config = config
        self.dist_timeout_s = dist_timeout_s
        self.world_size = config.world_size
        self.devices = resolve_devices(devices, self.world_size)
        self.init_distributed = init_distributed
        self.error_grace_s = error_grace_s
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.catch_sigterm = catch_sigterm
        self._env = {str(k): str(v) for k, v in (env or {}).items()}
        defaults = {
            "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // self.world_size)),
            **loopback_sockets_env(),  # the world is on this host: no other may reach it
        }
        for key, value in defaults.items():
            if key not in os.environ and key not in self._env:
                self._env[key] = value
        self.startup_timeout = startup_timeout
        self.pids: list[int] = []
        self._lock = threading.RLock()
        self._seq = 0
        self._exit_ranks: dict[int, int] = {}
        self._workers = WorkerProcesses()
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
        self._store = loopback_store(master_addr)
        # The death signal fires when the spawning *thread* ends: only trust the main
        # thread; elsewhere the worker's watchdog (and the reaper's poll) does the job.
        main_thread = threading.current_thread() is threading.main_thread()
        base = WorkerSpec(
            rank=0,
            local_rank=0,
            world_size=self.world_size,
            device="cpu",
            config=self.config,
            store_host=master_addr,
            store_port=self._store.port,
            init_distributed=self.init_distributed,
            communicator=communicator,
            timeout_s=self.dist_timeout_s,
            env=self._env,
            parent_pid=os.getpid(),
            use_death_signal=main_thread,
            catch_sigterm=self.catch_sigterm,
        )
        workers = self._workers
        try:
            workers.spawn(base, self.devices, worker_cls, worker_factory, self.heartbeat_timeout_s)
            self._exit_ranks = {fd: r for r, fd in enumerate(workers.exit_fds)}
            # One failed rank fails the start at once: the others may wait for it forever.
            everyone = list(range(self.world_size))
            replies = self._gather(
                everyone, self.startup_timeout, "start-up", error_grace=0.0, watch=False
            )
        except BaseException:
            workers.kill()
            raise
        failures = {r: m for r, m in replies.items() if m[0] == "error"}
        if failures:
            workers.kill()
            raise remote_error(failures, "failed to start")
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
            raise remote_error(failures, f"in {what}")
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
        watch: bool = True,
    ) -> dict[int, tuple]:
        """One reply from each of ``ranks``, watching every worker's end and (with
        ``watch``) the pending ranks' heartbeats meanwhile.

        After the first error reply the others get ``error_grace`` s (default
        ``self.error_grace_s``); if some are still silent then, every worker is stopped.
        """
        error_grace = self.error_grace_s if error_grace is None else error_grace
        channels = self._workers.channels
        monitor = self._workers.monitor
        pending = {channels[r].fileno(): r for r in ranks}
        ended = self._exit_ranks
        poller = select.poll()
        for fd in (*pending, *ended):
            poller.register(fd, select.POLLIN)
        replies: dict[int, tuple] = {}
        now = time.monotonic()
        deadline = None if timeout is None else now + timeout
        error_deadline = None
        watch = watch and monitor.timeout is not None
        next_look = now + monitor.interval if watch else None
        monitor.watch(ranks)
        while pending:
            limits = [d for d in (deadline, error_deadline) if d is not None]
            wait_ms = -1
            if limits:
                remaining = min(limits) - time.monotonic()
                if remaining <= 0:
                    break
                wait_ms = max(1, int(remaining * 1000) + 1)
            if next_look is not None:
                look_ms = max(1, int((next_look - time.monotonic()) * 1000) + 1)
                wait_ms = look_ms if wait_ms < 0 else min(wait_ms, look_ms)
            for fd, _ in poller.poll(wait_ms):
                if fd in ended:
                    hint = _STARTUP_HINT if what == "start-up" else ""
                    self._died(ended[fd], f"during {what}{hint}")
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
            if next_look is not None and time.monotonic() >= next_look and pending:
                next_look = time.monotonic() + monitor.interval
                stall = monitor.find_stuck(sorted(pending.values()), self.pids)
                if stall is not None:
                    self._stuck(stall, sorted(pending.values()))
        if pending:
            missing = sorted(pending.values())
            failures = {r: m for r, m in replies.items() if m[0] == "error"}
            if failures:
                self._workers.kill()
                if error_grace > 0:
                    note = (
                        f"ranks {missing} were still busy {error_grace:g} s later (stuck "
                        "waiting for the failed rank?)"
                    )
                else:
                    note = f"ranks {missing} had not answered yet"
                raise remote_error(failures, f"in {what}; {note}, so every worker was stopped")
            self._timed_out(missing, timeout, what)
        return replies

    def _timed_out(self, missing: list[int], timeout: float | None, what: str) -> None:
        """Stop everything; raise :class:`RpcTimeoutError` naming the ranks gone silent."""
        named, detail = self._workers.monitor.timeout_report(missing, self.pids)
        self._workers.kill()
        waiting = [r for r in missing if r not in named]
        raise RpcTimeoutError(named, timeout, what, waiting, detail)

    def _stuck(self, stall: Stall, pending: list[int]) -> None:
        """Stop every worker and raise the stuck rank's :class:`WorkerStuckError`."""
        error = self._workers.monitor.stuck_error(stall, pending, self.pids)
        self._workers.kill()
        logger.error("%s", error)
        raise error

    def _receive(self, rank: int, what: str) -> tuple:
        reply = self._workers.receive(rank)
        return reply if reply is not None else self._died(rank, f"during {what}")

    def _died(self, rank: int, detail: str) -> NoReturn:
        """Stop every worker and raise :class:`WorkerDiedError` (or a shut-down error)."""
        closing = self._workers.closed
        exitcode = None
        if rank < len(self._workers.procs):
            kill_group(self._workers.procs[rank].pid)  # what it started
            exitcode = self._workers.exit_code(rank, wait_s=1.0)
            if exitcode is None:
                detail += " (its exit code is unknown: the fork server that started it is gone)"
        self._workers.kill()
        if closing:
            raise ExecutorError(f"the Executor was shut down {detail}")
        raise WorkerDiedError(rank, exitcode, f"{detail}; every other worker has been stopped")

    # Life cycle ----------------------------------------------------------------------

    def request_stop(self, signum: int) -> None:
        """Set a stop request (a signal number) that code in every worker reads through
        :func:`vidpar.executor.liveness.stop_requested`, e.g. to save and stop training."""
        if self._workers.monitor is not None:
            self._workers.monitor.request_stop(signum)

    @property
    def is_alive(self) -> bool:
        """Whether the Executor is open and every worker process still runs."""
        return not self._workers.closed and all(self._workers.running())

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
