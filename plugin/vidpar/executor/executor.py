"""The Executor: one Worker process per rank, RPCs to all (or some) of them, and no orphans.

The parent keeps one duplex pipe per worker. A call encodes its request once
(:func:`~vidpar.executor.wire.encode`), writes the same frame to every chosen worker, then
waits (:mod:`~vidpar.executor.answers`) with ``poll`` on the chosen workers' pipes together with *every* worker's pidfd
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
import os
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import timedelta
from typing import Any

from vidpar.config import ParallelConfig
from vidpar.executor.answers import STARTUP, gather, verdict, worker_died
from vidpar.executor.errors import ExecutorError
from vidpar.executor.processes import SHUTDOWN_GRACE_S, WorkerProcesses, resolve_devices
from vidpar.executor.rendezvous import loopback_sockets_env, loopback_store
from vidpar.executor.wire import STARTUP_SEQ, Ready, Request, close_all, encode
from vidpar.executor.worker import Worker, WorkerSpec

#: Seconds the other ranks of a call get to answer once one rank has raised.
ERROR_GRACE_S = 1.5
#: Seconds without a heartbeat after which a worker that is not busy is stuck.
HEARTBEAT_TIMEOUT_S = 60.0


class Executor:
    """Runs one :class:`~vidpar.executor.Worker` process per rank of ``parallel``.

    Args:
        parallel: the parallel layout; ``parallel.world_size`` workers are started.
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
        dist_timeout: torch.distributed's collective timeout in the workers, a
            ``datetime.timedelta`` as torch takes it (``None``: torch's default).
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

    :attr:`spec` (a :class:`~vidpar.executor.WorkerSpec`) is what every worker starts
    with; :attr:`parallel` and :attr:`devices` read it. Start-up failures raise :class:`RemoteError` (the failing rank's traceback),
    :class:`WorkerDiedError` or :class:`RpcTimeoutError` and leave no process behind. Unless
    ``OMP_NUM_THREADS`` is set, each worker gets ``cpu_count // world_size`` threads. Each
    worker leads a process group of its own: what it starts dies with it, and with this
    process. No other host can reach the world: the rendezvous store listens on
    ``master_addr`` and, unless ``GLOO_SOCKET_IFNAME``/``NCCL_SOCKET_IFNAME`` are set, gloo
    and NCCL on the loopback interface.
    """

    def __init__(
        self,
        parallel: ParallelConfig,
        worker_factory: Callable[[Worker], Any] | None = None,
        devices: str | Sequence[str] | None = "auto",
        env: Mapping[str, str] | None = None,
        init_distributed: bool = True,
        communicator: str = "auto",
        *,
        worker_cls: type[Worker] = Worker,
        startup_timeout: float = 300.0,
        error_grace_s: float = ERROR_GRACE_S,
        master_addr: str = "127.0.0.1",
        dist_timeout: timedelta | None = None,
        heartbeat_timeout_s: float | None = HEARTBEAT_TIMEOUT_S,
        catch_sigterm: bool = False,
    ) -> None:
        devices = tuple(resolve_devices(devices, parallel.world_size))
        self.error_grace_s = error_grace_s
        self.pids: list[int] = []
        self._lock = threading.RLock()
        self._seq = STARTUP_SEQ
        self._workers = WorkerProcesses()
        atexit.register(self._workers.stop)
        # Stops the workers if the Executor is garbage-collected; at interpreter exit the
        # atexit hook above runs first (before multiprocessing joins its children).
        self._finalizer = weakref.finalize(self, self._workers.stop)
        self._finalizer.atexit = False
        try:
            self._store = loopback_store(master_addr)
            self.spec = WorkerSpec(
                parallel=parallel,
                devices=devices,
                store_host=master_addr,
                store_port=self._store.port,
                init_distributed=init_distributed,
                communicator=communicator,
                dist_timeout=dist_timeout,
                env=_worker_env(env, parallel.world_size),
                parent_pid=os.getpid(),
                # The death signal fires when the spawning *thread* ends: only trust the
                # main thread; elsewhere the worker's watchdog (and the reaper) does the job.
                use_death_signal=threading.current_thread() is threading.main_thread(),
                catch_sigterm=catch_sigterm,
            )
            self._start(worker_cls, worker_factory, startup_timeout, heartbeat_timeout_s)
        except BaseException:
            self._finalizer.detach()
            raise

    @property
    def parallel(self) -> ParallelConfig:
        """The layout the workers run."""
        return self.spec.parallel

    @property
    def devices(self) -> list[str]:
        """Each rank's device."""
        return list(self.spec.devices)

    # Start-up ------------------------------------------------------------------------

    def _start(
        self,
        worker_cls: type[Worker],
        worker_factory: Callable[[Worker], Any] | None,
        startup_timeout: float,
        heartbeat_timeout_s: float | None,
    ) -> None:
        workers = self._workers
        try:
            workers.spawn(self.spec, worker_cls, worker_factory, heartbeat_timeout_s)
            # One failed rank fails the start at once: the others may wait for it forever.
            everyone = list(range(self.spec.world_size))
            answers = gather(
                workers, [], everyone, STARTUP_SEQ, STARTUP, startup_timeout, 0.0, watch=False
            )
            ready: dict[int, Ready] = verdict(answers, "failed to start")
        except BaseException:
            workers.kill()
            raise
        self.pids = [ready[r].pid for r in everyone]

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
        ``"shutdown"`` is no RPC: :meth:`shutdown` stops the workers.

        Raises :class:`RemoteError` when a worker raised (the Executor stays usable when
        every chosen rank answered), :class:`WorkerDiedError` when a worker died and
        :class:`RpcTimeoutError` (a ``TimeoutError``) when ranks did not answer within
        ``timeout`` seconds; after those two the Executor is shut down.
        """
        if isinstance(method, str) and method == "shutdown":
            raise ValueError(
                "collective_rpc('shutdown') is not an RPC: call Executor.shutdown(), which "
                "stops every worker (politely, then by force)"
            )
        targets = self._targets(ranks)
        with self._lock:
            self._check_open()
            self._seq += 1
            request = Request(self._seq, method, args, kwargs)
            what = f"collective_rpc({request.name!r})"
            self._send(request, targets, what)
            try:
                answers = gather(
                    self._workers,
                    self.pids,
                    targets,
                    request.seq,
                    what,
                    timeout,
                    self.error_grace_s,
                )
            except (ExecutorError, TimeoutError):
                raise
            except BaseException:  # e.g. KeyboardInterrupt: answers are pending, so stop
                self._workers.kill()
                raise
        answers = verdict(answers, f"in {what}")
        return [answers[r].value for r in targets]

    def _targets(self, ranks: Iterable[int] | None) -> list[int]:
        world_size = self.spec.world_size
        if ranks is None:
            return list(range(world_size))
        given = list(ranks)
        if len(set(given)) != len(given) or any(
            not isinstance(r, int) or not 0 <= r < world_size for r in given
        ):
            raise ValueError(f"ranks must be distinct integers in [0, {world_size}), got {given}")
        return sorted(given)

    def _check_open(self) -> None:
        if self._workers.closed:
            raise ExecutorError("the Executor has been shut down")

    def _send(self, request: Request, ranks: list[int], what: str) -> None:
        """The same frame (and shared memory) to each of ``ranks``; nothing is sent when
        the request cannot be encoded."""
        frame, fds = encode(request)
        try:
            channels = self._workers.channels
            for rank in ranks:
                try:
                    channels[rank].send_encoded(frame, fds)
                except OSError as exc:
                    worker_died(self._workers, rank, f"while {what} was being sent ({exc})")
        except BaseException:
            self._workers.kill()
            raise
        finally:
            close_all(fds)

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
        """Stop every worker: each is sent a :class:`~vidpar.executor.wire.Shutdown` and gets
        ``grace`` s to release its payload and groups and leave, then is killed. The one way
        to stop them; idempotent; also runs at interpreter exit and when the Executor is
        garbage-collected."""
        self._workers.stop(grace)
        self._finalizer.detach()

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    def __repr__(self) -> str:
        state = "closed" if self._workers.closed else f"pids={self._workers.pids()}"
        return f"Executor({self.parallel.describe()}, devices={self.devices}, {state})"


def _worker_env(env: Mapping[str, str] | None, world_size: int) -> dict[str, str]:
    """The caller's ``env`` for the workers, with defaults unless this process or ``env``
    sets them: an equal share of the CPUs' threads each, gloo and NCCL on loopback."""
    worker_env = {str(k): str(v) for k, v in (env or {}).items()}
    defaults = {
        "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // world_size)),
        **loopback_sockets_env(),  # the world is on this host: no other may reach it
    }
    for key, value in defaults.items():
        if key not in os.environ and key not in worker_env:
            worker_env[key] = value
    return worker_env
