"""Orphan protection: no worker, and no process a worker started, outlives its parent.

A spawned worker asks Linux (``PR_SET_PDEATHSIG``) to kill it when its parent thread ends;
a forked one (:mod:`~vidpar.executor.start_method`) is the fork server's child, which
outlives the caller, so it has no death signal. Either way a watchdog thread exits the
worker once the caller is gone (its pidfd, or the parent pid) or the control connection
has hung up for :data:`HANGUP_GRACE_S`.

Each worker leads a process group of its own, which its children (data loader workers,
``subprocess`` calls) join. The group is killed with the worker: by the worker itself when
it leaves (:func:`kill_own_group`), by the Executor when it kills a worker or finds one dead,
and by a reaper process (:func:`start_reaper`, one per Executor) when the Executor's process
itself dies.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import signal
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection

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


def _caller_handle(parent_pid: int) -> int | None:
    """A pidfd of the caller (readable once it has exited); ``None`` where there are none.
    Exits at once if the caller has already gone."""
    try:
        return os.pidfd_open(parent_pid)
    except ProcessLookupError:
        os._exit(1)
    except (AttributeError, OSError):
        return None


def _watch_parent(parent_pid: int, control_fd: int, caller_fd: int | None) -> None:
    """Exit at once when the caller is gone (the fallback to the death signal, and the only
    guard of a forked worker).

    Wakes when the caller exits, when the control socket hangs up (without touching data
    the main thread reads) or every second; without a pidfd it compares the parent pid.
    """
    poller = select.poll()
    poller.register(control_fd, getattr(select, "POLLRDHUP", 0))
    if caller_fd is not None:
        poller.register(caller_fd, select.POLLIN)
    spawned = os.getppid() == parent_pid
    hung_up_at: float | None = None
    while True:
        events = dict(poller.poll(50 if hung_up_at is not None else 1000))
        if caller_fd in events or (spawned and os.getppid() != parent_pid):
            os._exit(1)
        if control_fd in events and hung_up_at is None:
            hung_up_at = time.monotonic()
            poller.unregister(control_fd)
            os.close(control_fd)
        if hung_up_at is not None and time.monotonic() - hung_up_at > HANGUP_GRACE_S:
            os._exit(1)


def guard_against_orphaning(parent_pid: int, conn: Connection, use_death_signal: bool) -> None:
    """Arm the death signal (a worker the caller spawned itself) and start the watchdog."""
    spawned = os.getppid() == parent_pid
    if use_death_signal and spawned:
        _set_parent_death_signal()
        if os.getppid() != parent_pid:  # the parent died before the death signal was armed
            os._exit(1)
    caller_fd = _caller_handle(parent_pid)
    if caller_fd is None and not spawned:
        raise RuntimeError("a forked worker needs pidfds (Linux 5.3) to watch its caller")
    watchdog = threading.Thread(
        target=_watch_parent,
        args=(parent_pid, os.dup(conn.fileno()), caller_fd),
        name="vidpar-parent-watchdog",
        daemon=True,
    )
    watchdog.start()


def lead_own_group() -> None:
    """Make this process the leader of a new process group, which its children join."""
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)


def kill_own_group() -> None:
    """SIGKILL every other member of this process's group, if it leads one (the children
    it leaves behind). They are not reaped here: their owners (multiprocessing, a
    ``Popen``) still hold their pids and reap them, or the system does after we exit."""
    import psutil

    me = os.getpid()
    if os.getpgid(0) != me:
        return
    for pid in psutil.pids():
        with contextlib.suppress(OSError):
            if pid != me and os.getpgid(pid) == me:
                os.kill(pid, signal.SIGKILL)


def kill_group(leader: int) -> None:
    """SIGKILL the process group that ``leader`` leads (nothing if there is none). Call it
    while ``leader`` is alive or not yet reaped, so its pid cannot have been reused."""
    with contextlib.suppress(OSError):
        os.killpg(leader, signal.SIGKILL)


# Run as ``python -c _REAPER <parent pid> <death signal or 0> <worker pid>...``: waits for
# the parent to die (its death signal, or a poll), then kills every worker's group.
_REAPER = """
import ctypes, os, signal, sys, time
parent, death_signal = int(sys.argv[1]), int(sys.argv[2])
for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(s, signal.SIG_IGN)
if death_signal:
    signal.pthread_sigmask(signal.SIG_BLOCK, [death_signal])
    ctypes.CDLL(None).prctl(1, death_signal, 0, 0, 0)
while os.getppid() == parent:
    if death_signal:
        signal.sigtimedwait([death_signal], 0.5)
    else:
        time.sleep(0.5)
for pid in map(int, sys.argv[3:]):
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass
"""


def start_reaper(worker_pids: list[int], use_death_signal: bool) -> subprocess.Popen | None:
    """A tiny process that kills the workers' groups once this process has died.

    Its death signal is only armed when this is the main thread (it fires when the
    spawning *thread* ends); otherwise it polls for its parent twice a second."""
    if not sys.platform.startswith("linux"):
        return None
    death_signal = int(signal.SIGUSR1) if use_death_signal else 0
    args = [str(os.getpid()), str(death_signal), *map(str, worker_pids)]
    return subprocess.Popen(
        [sys.executable, "-I", "-S", "-c", _REAPER, *args],
        stdin=subprocess.DEVNULL,
        close_fds=True,
    )
