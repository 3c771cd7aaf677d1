"""Orphan protection: a worker never outlives the process that started it.

``PR_SET_PDEATHSIG`` asks Linux to kill the worker when its parent thread ends, and a
watchdog thread exits the worker once the parent is gone or the control connection has
hung up for :data:`HANGUP_GRACE_S`.
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
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
