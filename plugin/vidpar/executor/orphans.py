"""Orphan protection: no worker, and no process a worker started, outlives its parent.

``PR_SET_PDEATHSIG`` asks Linux to kill the worker when its parent thread ends, and a
watchdog thread exits the worker once the parent is gone or the control connection has
hung up for :data:`HANGUP_GRACE_S`.

Each worker leads a process group of its own, which its children (data loader workers,
``subprocess`` calls) join. The group is killed with the worker: by the worker itself when
it leaves (:func:`kill_own_group`), by the Executor when it kills a worker or finds one dead,
and by a reaper process (:func:`start_reaper`, one per Executor) when the Executor's process
itself dies: its workers then die by the death signal before any of their code can run.
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


def guard_against_orphaning(parent_pid: int, conn: Connection, use_death_signal: bool) -> None:
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
