"""The wait for a call's answers: each chosen worker's answer read as it comes, while every
worker's end and (during calls) the pending ranks' heartbeats are watched, until the call's
deadline or, once a rank has raised, the others' grace runs out; then the verdict.

Every way the wait can fail stops every worker first (:class:`WorkerProcesses.kill`):
a worker's death (:class:`WorkerDiedError`), a stuck worker (:class:`WorkerStuckError`),
ranks silent past the deadline (:class:`RpcTimeoutError`), or ranks still busy after
another one raised (its :class:`RemoteError`, naming them).
"""

from __future__ import annotations

import logging
import select
import time
from typing import Any, NoReturn

from vidpar.executor.errors import (
    ExecutorError,
    RpcTimeoutError,
    WorkerDiedError,
    remote_error,
)
from vidpar.executor.orphans import kill_group
from vidpar.executor.processes import WorkerProcesses
from vidpar.executor.wire import Answer, ErrorReply

logger = logging.getLogger(__name__)

STARTUP = "start-up"
_STARTUP_HINT = (
    " (its output above says why; a script that starts an Executor needs an "
    "`if __name__ == '__main__':` guard)"
)


class Deadline:
    """A moment ``seconds`` from now; ``None``: never."""

    __slots__ = ("at",)

    def __init__(self, seconds: float | None) -> None:
        self.at = None if seconds is None else time.monotonic() + seconds

    def passed(self) -> bool:
        return self.at is not None and time.monotonic() >= self.at

    @staticmethod
    def wait_ms(*deadlines: Deadline | None) -> int:
        """Milliseconds to wait for the earliest of ``deadlines`` (at least 1; ``-1``:
        none will come), as ``poll`` takes them."""
        moments = [d.at for d in deadlines if d is not None and d.at is not None]
        if not moments:
            return -1
        return max(1, int((min(moments) - time.monotonic()) * 1000) + 1)


def gather(
    workers: WorkerProcesses,
    pids: list[int],
    ranks: list[int],
    seq: int,
    what: str,
    timeout: float | None,
    error_grace: float,
    watch: bool = True,
) -> dict[int, Answer]:
    """The answers of ``ranks`` to request ``seq`` (``what`` names it in errors).

    After the first error the others get ``error_grace`` s; then, or after ``timeout``
    s, the wait gives up (:func:`_give_up`). With ``watch`` a pending rank whose heartbeat
    stops is named stuck.
    """
    monitor = workers.monitor
    exit_ranks = {fd: r for r, fd in enumerate(workers.exit_fds)}
    pending = {workers.channels[r].fileno(): r for r in ranks}
    poller = select.poll()
    for fd in (*pending, *exit_ranks):
        poller.register(fd, select.POLLIN)
    answers: dict[int, Answer] = {}
    deadline, grace = Deadline(timeout), Deadline(None)
    look = Deadline(monitor.interval) if watch and monitor.timeout is not None else None
    monitor.watch(ranks)
    while pending and not (deadline.passed() or grace.passed()):
        for fd, _ in poller.poll(Deadline.wait_ms(deadline, grace, look)):
            if fd in exit_ranks:
                hint = _STARTUP_HINT if what == STARTUP else ""
                worker_died(workers, exit_ranks[fd], f"during {what}{hint}")
            rank = pending.pop(fd, None)
            if rank is None:
                continue
            poller.unregister(fd)
            answers[rank] = _receive(workers, rank, seq, what)
            if isinstance(answers[rank], ErrorReply) and grace.at is None:
                grace = Deadline(error_grace)
        if look is not None and look.passed() and pending:
            look = Deadline(monitor.interval)
            _check_progress(workers, pids, sorted(pending.values()))
    if pending:
        _give_up(workers, pids, sorted(pending.values()), answers, timeout, error_grace, what)
    return answers


def verdict(answers: dict[int, Answer], context: str) -> dict[int, Any]:
    """The answers of a call or start-up when none is an error; else the
    :class:`RemoteError` of the ranks that raised (``context`` says where)."""
    failures = {r: a.error for r, a in answers.items() if isinstance(a, ErrorReply)}
    if failures:
        raise remote_error(failures, context)
    return answers


def worker_died(workers: WorkerProcesses, rank: int, detail: str) -> NoReturn:
    """Stop every worker and raise :class:`WorkerDiedError` (or a shut-down error)."""
    closing = workers.closed
    exitcode = None
    if rank < len(workers.procs):
        kill_group(workers.procs[rank].pid)  # what it started
        exitcode = workers.exit_code(rank, wait_s=1.0)
        if exitcode is None:
            detail += " (its exit code is unknown: the fork server that started it is gone)"
    workers.kill()
    if closing:
        raise ExecutorError(f"the Executor was shut down {detail}")
    raise WorkerDiedError(rank, exitcode, f"{detail}; every other worker has been stopped")


def _receive(workers: WorkerProcesses, rank: int, seq: int, what: str) -> Answer:
    """The answer of ``rank``, whose pipe is readable; its death if there is none."""
    answer = workers.receive(rank)
    if answer is None:
        worker_died(workers, rank, f"during {what}")
    if answer.seq not in (seq, None):  # cannot happen unless the protocol broke
        workers.kill()
        raise ExecutorError(
            f"rank {rank} answered request {answer.seq} during {what} (request {seq}); "
            "every worker has been stopped"
        )
    return answer


def _check_progress(workers: WorkerProcesses, pids: list[int], pending: list[int]) -> None:
    """Stop every worker and raise :class:`WorkerStuckError` if one of ``pending`` is stuck."""
    stall = workers.monitor.find_stuck(pending, pids)
    if stall is None:
        return
    error = workers.monitor.stuck_error(stall, pending, pids)
    workers.kill()
    logger.error("%s", error)
    raise error


def _give_up(
    workers: WorkerProcesses,
    pids: list[int],
    missing: list[int],
    answers: dict[int, Answer],
    timeout: float | None,
    error_grace: float,
    what: str,
) -> NoReturn:
    """Stop every worker: ``missing`` did not answer. After another rank's error, raise
    that (they are probably stuck waiting for it), naming them; else
    :class:`RpcTimeoutError`, naming the ranks gone silent."""
    failures = {r: a.error for r, a in answers.items() if isinstance(a, ErrorReply)}
    if not failures:
        named, detail = workers.monitor.timeout_report(missing, pids)
        workers.kill()
        waiting = [r for r in missing if r not in named]
        raise RpcTimeoutError(named, timeout, what, waiting, detail)
    workers.kill()
    if error_grace > 0:
        note = (
            f"ranks {missing} were still busy {error_grace:g} s later (stuck waiting for "
            "the failed rank?)"
        )
    else:
        note = f"ranks {missing} had not answered yet"
    raise remote_error(failures, f"in {what}; {note}, so every worker was stopped")
