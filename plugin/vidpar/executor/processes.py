"""The Executor's worker processes and how they are stopped, children and all.

A worker's end is watched through a pidfd of the worker itself (Linux), not through
multiprocessing's sentinel: a forked worker's sentinel is its fork server's word, which
would read as every worker dying if the server died (an OOM kill, a stray ``kill``) while
the workers live on.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import multiprocessing as mp
import os
import select
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import wait
from typing import Any

import torch

from vidpar.executor.liveness import Monitor
from vidpar.executor.orphans import kill_group, start_reaper
from vidpar.executor.start_method import CallerState, main_script_runnable, worker_context
from vidpar.executor.wire import Answer, Channel, ErrorReply, ExceptionInfo, Shutdown
from vidpar.executor.worker import Worker, WorkerSpec, worker_environment, worker_main

logger = logging.getLogger(__name__)

#: Time workers get to leave on their own at ``shutdown()`` before they are killed.
SHUTDOWN_GRACE_S = 10.0
_ENV_LOCK = threading.Lock()


@contextlib.contextmanager
def spawn_environment(env: dict[str, str]):
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


def descendants(procs: Sequence[mp.process.BaseProcess]) -> list[int]:
    """Pids of every process below ``procs`` (some may have left the workers' groups)."""
    import psutil

    pids = []
    for proc in procs:
        with contextlib.suppress(psutil.Error, ValueError):
            pids += [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    return pids


def resolve_devices(devices: str | Sequence[str] | None, world_size: int) -> list[str]:
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


class WorkerProcesses:
    """The worker processes, their channels, their liveness monitor and their reaper;
    knows how to stop them. It holds no reference to the Executor, so it can serve as the
    Executor's finaliser."""

    def __init__(self) -> None:
        self.procs: list[mp.process.BaseProcess] = []
        #: One file descriptor per worker that becomes readable when it ends: a pidfd of
        #: the worker where the platform has them, else multiprocessing's sentinel.
        self.exit_fds: list[int] = []
        self._pidfds: list[int | None] = []
        self._server_pidfd: int | None = None  # the fork server's, which reports exit codes
        self.channels: list[Channel] = []
        self.monitor: Monitor | None = None
        self.reaper: subprocess.Popen | None = None
        self.closed = False
        self._lock = threading.Lock()
        self._reap_lock = threading.Lock()

    def running(self) -> list[bool]:
        """Whether each worker still runs (its exit fd is not readable yet)."""
        poller = select.poll()
        for fd in self.exit_fds:
            poller.register(fd, select.POLLIN)
        ended = {fd for fd, _ in poller.poll(0)}
        return [fd not in ended for fd in self.exit_fds]

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def exit_code(self, rank: int, wait_s: float) -> int | None:
        """The exit code of ``rank``, which has ended (waiting up to ``wait_s`` s for it);
        ``None`` if the fork server that would report it is gone."""
        proc = self.procs[rank]
        proc.join(timeout=wait_s)
        server = self._server_pidfd
        if proc.exitcode == 255 and server is not None and select.select([server], [], [], 0)[0]:
            return None  # what multiprocessing reads when the server's pipe closed
        return proc.exitcode

    def spawn(
        self,
        spec: WorkerSpec,
        worker_cls: type[Worker],
        worker_factory: Callable[[Worker], Any] | None,
        heartbeat_timeout_s: float | None,
    ) -> None:
        """Start one worker per rank of ``spec`` (rank ``r`` on ``spec.devices[r]``) with
        its liveness link, then the reaper."""
        ctx = worker_context()
        caller = CallerState(forked=ctx.get_start_method() == "forkserver")
        self.monitor = Monitor(ctx, spec.world_size, heartbeat_timeout_s)
        for rank in range(spec.world_size):
            parent_end, child_end = ctx.Pipe(duplex=True)
            proc = ctx.Process(
                target=worker_main,
                args=(
                    spec,
                    rank,
                    child_end,
                    self.monitor.link(rank),
                    caller,
                    worker_cls,
                    worker_factory,
                ),
                name=f"vidpar-worker-{rank}",
                daemon=False,  # workers may start processes of their own (data loaders)
            )
            # A forked worker takes its environment from ``caller``; the fork server, which
            # may start here, keeps the caller's own.
            env = {} if caller.forked else worker_environment(spec, rank)
            with spawn_environment(env), main_script_runnable():
                proc.start()
            child_end.close()
            pidfd = _open_pidfd(proc.pid)
            if caller.forked and self._server_pidfd is None:
                self._server_pidfd = _open_pidfd(_parent(proc.pid))
            self.procs.append(proc)
            self._pidfds.append(pidfd)
            self.exit_fds.append(proc.sentinel if pidfd is None else pidfd)
            self.channels.append(Channel(parent_end))
        self.reaper = start_reaper(self.pids(), use_death_signal=spec.use_death_signal)

    def receive(self, rank: int) -> Answer | None:
        """The next answer of ``rank`` (an :class:`ErrorReply` if it cannot be unpickled
        here); ``None`` if its connection broke (it died)."""
        channel = self.channels[rank]
        try:
            return channel.recv()
        except (EOFError, OSError):
            return None
        except Exception as exc:  # e.g. the result's class cannot be imported here
            note = "(the reply arrived but could not be unpickled in the caller)"
            return ErrorReply(None, ExceptionInfo.of(exc, note))

    def stop(self, grace: float = SHUTDOWN_GRACE_S) -> None:
        """Ask every worker to leave, wait up to ``grace`` s, then kill what remains.
        Idempotent."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
        atexit.unregister(self.stop)
        if grace > 0:
            for running, channel in zip(self.running(), self.channels, strict=True):
                if running:
                    with contextlib.suppress(OSError, ValueError):
                        channel.send(Shutdown())
        self._reap(grace)

    def kill(self) -> None:
        """Stop every worker now (SIGKILL, with their process groups). Idempotent."""
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
        ranks = range(len(self.procs))
        alive = [r for r, running in zip(ranks, self.running(), strict=True) if running]
        while alive and grace > 0:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            wait([self.exit_fds[r] for r in alive], timeout=remaining)
            running = self.running()
            alive = [r for r in alive if running[r]]
        for pid in descendants([self.procs[r] for r in alive]):  # left their worker's group
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        for rank in alive:
            kill_group(self.procs[rank].pid)  # the worker and what it started
            self._kill(rank)
        kill_deadline = time.monotonic() + 30
        while alive and time.monotonic() < kill_deadline:
            wait([self.exit_fds[r] for r in alive], timeout=kill_deadline - time.monotonic())
            running = self.running()
            alive = [r for r in alive if running[r]]
        for rank, running in zip(ranks, self.running(), strict=True):
            if running:  # cannot happen after SIGKILL, but never hang here
                logger.error("worker pid %s did not exit after SIGKILL", self.procs[rank].pid)
        for proc in self.procs:  # collects the exit codes (at once if the server is gone)
            proc.join(timeout=5)
        for channel in self.channels:
            channel.close()
        for proc in self.procs:
            with contextlib.suppress(ValueError):
                proc.close()
        for pidfd in (*self._pidfds, self._server_pidfd):
            if pidfd is not None:
                os.close(pidfd)
        if self.reaper is not None:
            self.reaper.kill()
            self.reaper.wait()
        if self.monitor is not None:
            self.monitor.close()
        self.procs, self.channels, self.reaper = [], [], None
        self.exit_fds, self._pidfds, self._server_pidfd = [], [], None

    def _kill(self, rank: int) -> None:
        """SIGKILL one worker (through its pidfd: never another process that took its pid)."""
        pidfd = self._pidfds[rank]
        with contextlib.suppress(OSError, ValueError):
            if pidfd is None:
                self.procs[rank].kill()
            else:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)


def _parent(pid: int) -> int | None:
    """The parent of ``pid`` (``None`` if it has gone)."""
    import psutil

    try:
        return psutil.Process(pid).ppid()
    except psutil.Error:
        return None


def _open_pidfd(pid: int | None) -> int | None:
    """A pidfd of ``pid``; ``None`` where the platform has none (or it has already gone,
    when its sentinel tells the same)."""
    if pid is None or not hasattr(os, "pidfd_open"):
        return None
    try:
        return os.pidfd_open(pid)
    except OSError:
        return None
