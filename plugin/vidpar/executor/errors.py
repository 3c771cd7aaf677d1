"""The Executor's errors: a worker raised, died, did not answer in time, or got stuck."""

from __future__ import annotations

import signal
from collections.abc import Sequence

from vidpar.executor.wire import ExceptionInfo


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
    """Some workers did not answer in time; the Executor has been shut down.

    ``ranks`` are the ranks that stopped responding (no heartbeat, or a stopped process)
    when that could be told, else every rank that had not answered; ``waiting`` the other
    ranks that had not answered (busy, perhaps waiting for ``ranks`` in a collective);
    ``detail`` what was seen of ``ranks`` (state, activity, Python stacks).
    """

    def __init__(
        self,
        ranks: Sequence[int],
        timeout: float,
        what: str,
        waiting: Sequence[int] = (),
        detail: str = "",
    ) -> None:
        self.ranks = list(ranks)
        self.timeout = timeout
        self.what = what
        self.waiting = list(waiting)
        self.detail = detail
        text = (
            f"{what}: ranks {self.ranks} did not answer within {timeout:g} s; they are "
            "considered stuck and every worker has been stopped"
        )
        if self.waiting:
            text += f" (ranks {self.waiting} were still busy too, waiting for them?)"
        super().__init__(f"{text}\n{detail}" if detail else text)

    def __reduce__(self):
        return (type(self), (self.ranks, self.timeout, self.what, self.waiting, self.detail))


class WorkerStuckError(ExecutorError, TimeoutError):
    """A worker stopped making progress (no heartbeat for the liveness timeout while none
    of its threads ran or waited for a CPU); the Executor has stopped every worker.

    ``rank``, ``pid``, ``silent_s`` (seconds without a heartbeat), ``state`` (what its
    process was doing), ``activity`` (the RPC and training step it was in) and ``stacks``
    (its Python stacks, dumped by ``faulthandler``; empty if it could not dump them).
    """

    def __init__(
        self,
        rank: int,
        pid: int,
        silent_s: float,
        state: str,
        activity: str,
        stacks: str,
        others: str = "",
    ) -> None:
        self.rank = rank
        self.pid = pid
        self.silent_s = silent_s
        self.state = state
        self.activity = activity
        self.stacks = stacks
        self.others = others
        text = (
            f"worker rank {rank} (pid {pid}) is stuck: no heartbeat for {silent_s:.0f} s and "
            f"its process is {state}; it was {activity}. Every worker has been stopped."
        )
        if others:
            text += f"\nThe other ranks were: {others}"
        dump = stacks.strip() or "(it did not dump them)"
        super().__init__(f"{text}\n--- Python stacks of rank {rank} ---\n{dump}")

    def __reduce__(self):
        args = (self.rank, self.pid, self.silent_s, self.state, self.activity, self.stacks)
        return (type(self), (*args, self.others))


def remote_error(failures: dict[int, ExceptionInfo], context: str) -> RemoteError:
    """One :class:`RemoteError` for what the ranks of a call raised (the lowest rank's, the
    others in ``.errors``)."""
    errors = {
        rank: RemoteError(
            rank, info.exc_type, info.message, info.traceback, info.exception(), context
        )
        for rank, info in sorted(failures.items())
    }
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
