"""The Executor's errors: a worker raised, died, did not answer in time, or got stuck."""

from __future__ import annotations

import signal
from dataclasses import dataclass, field, fields

from vidpar.executor.wire import ExceptionInfo


class ExecutorError(RuntimeError):
    """Base class of the Executor's errors."""


class _FieldsError(ExecutorError):
    """An error that is a dataclass of what it reports: its message is made from its
    fields (:meth:`describe`), and it pickles as them."""

    def __post_init__(self) -> None:
        super().__init__(self.describe())

    def describe(self) -> str:
        raise NotImplementedError

    def __reduce__(self):
        return (type(self), tuple(getattr(self, f.name) for f in fields(self)))


@dataclass(eq=False, repr=False)
class RemoteError(_FieldsError):
    """An exception raised inside a worker.

    ``rank``, ``exc_type`` (the exception's type name), ``remote_traceback`` (its formatted
    traceback), ``exception`` (the original exception when it could be unpickled here, else
    ``None``; not pickled on) and ``errors`` (every failing rank's :class:`RemoteError` of
    the same call).
    """

    rank: int
    exc_type: str
    message: str
    remote_traceback: str
    exception: BaseException | None = None
    note: str = ""

    def __post_init__(self) -> None:
        self.errors: dict[int, RemoteError] = {self.rank: self}
        super().__post_init__()

    def describe(self) -> str:
        text = f"rank {self.rank} raised {self.exc_type}: {self.message}"
        if self.note:
            text += f"\n{self.note}"
        return f"{text}\n--- remote traceback (rank {self.rank}) ---\n{self.remote_traceback}"

    def __reduce__(self):
        cls, args = super().__reduce__()
        return cls, (*args[:4], None, self.note)


@dataclass(eq=False, repr=False)
class WorkerDiedError(_FieldsError):
    """A worker process ended unexpectedly; the Executor has stopped the others."""

    rank: int
    exitcode: int | None
    detail: str = ""

    def describe(self) -> str:
        return _death_message(self.rank, self.exitcode, self.detail)


@dataclass(eq=False, repr=False)
class RpcTimeoutError(_FieldsError, TimeoutError):
    """Some workers did not answer in time; the Executor has been shut down.

    ``ranks`` are the ranks that stopped responding (no heartbeat, or a stopped process)
    when that could be told, else every rank that had not answered; ``waiting`` the other
    ranks that had not answered (busy, perhaps waiting for ``ranks`` in a collective);
    ``detail`` what was seen of ``ranks`` (state, activity, Python stacks).
    """

    ranks: list[int]
    timeout: float
    what: str
    waiting: list[int] = field(default_factory=list)
    detail: str = ""

    def __post_init__(self) -> None:
        self.ranks, self.waiting = list(self.ranks), list(self.waiting)
        super().__post_init__()

    def describe(self) -> str:
        text = (
            f"{self.what}: ranks {self.ranks} did not answer within {self.timeout:g} s; they "
            "are considered stuck and every worker has been stopped"
        )
        if self.waiting:
            text += f" (ranks {self.waiting} were still busy too, waiting for them?)"
        return f"{text}\n{self.detail}" if self.detail else text


@dataclass(eq=False, repr=False)
class WorkerStuckError(_FieldsError, TimeoutError):
    """A worker stopped making progress (no heartbeat for the liveness timeout while none
    of its threads ran or waited for a CPU); the Executor has stopped every worker.

    ``rank``, ``pid``, ``silent_s`` (seconds without a heartbeat), ``state`` (what its
    process was doing), ``activity`` (the RPC and training step it was in), ``stacks``
    (its Python stacks, dumped by ``faulthandler``; empty if it could not dump them) and
    ``others`` (what the other pending ranks were doing).
    """

    rank: int
    pid: int
    silent_s: float
    state: str
    activity: str
    stacks: str
    others: str = ""

    def describe(self) -> str:
        text = (
            f"worker rank {self.rank} (pid {self.pid}) is stuck: no heartbeat for "
            f"{self.silent_s:.0f} s and its process is {self.state}; it was {self.activity}. "
            "Every worker has been stopped."
        )
        if self.others:
            text += f"\nThe other ranks were: {self.others}"
        dump = self.stacks.strip() or "(it did not dump them)"
        return f"{text}\n--- Python stacks of rank {self.rank} ---\n{dump}"


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
