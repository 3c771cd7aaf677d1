"""Liveness: each worker's heartbeat and activity, read by the Executor's process.

Every worker owns one small block of shared memory. A thread in the worker bumps its beat
counter every ``interval`` seconds; the worker records the RPC it runs, and code inside it
(the Lightning strategy's callback) says what it is doing through :func:`set_activity`.
While the Executor waits for replies it reads the blocks (:class:`Monitor`): a worker whose
counter has not moved for ``timeout`` seconds and that is not busy (a long C call holding
the GIL is) is stuck: stopped (``SIGSTOP``), blocked in the kernel, or waiting while it
holds the GIL. Busy means that one of its threads stayed runnable (running, or waiting
for a CPU) from one look to the next without ever sleeping: in state ``R`` both times, its
voluntary context switches unchanged (``/proc/PID/task/*/status``). The verdict therefore
does not depend on how much CPU a crowded machine gives the worker. Its Python stacks are
then dumped by ``faulthandler`` (on :data:`STACK_SIGNAL`) into an unnamed
per-worker file the Executor reads.

The block also carries a stop request the other way: a signal number that the Executor's
process (:meth:`Monitor.request_stop`) or the worker's own ``SIGTERM`` handler sets, and
that the training loop reads through :func:`stop_requested`.
"""

from __future__ import annotations

import contextlib
import ctypes
import faulthandler
import os
import signal
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any

from vidpar.executor.errors import WorkerStuckError

#: The signal that makes a worker write its Python stacks (all threads) to its stacks file.
STACK_SIGNAL = signal.SIGUSR2
_RPC_BYTES = 96
_ACTIVITY_BYTES = 160


class _Block(ctypes.Structure):
    _fields_ = [
        ("beats", ctypes.c_uint64),
        ("stop_signal", ctypes.c_int32),
        ("activity_since", ctypes.c_double),  # time.monotonic(), one clock for all processes
        ("rpc", ctypes.c_char * _RPC_BYTES),
        ("activity", ctypes.c_char * _ACTIVITY_BYTES),
    ]


# This process's block when it is an Executor worker (else None), and its pid: children
# forked from a worker (data loader workers) share the block but are not the worker.
_block: _Block | None = None
_owner_pid = 0
_local_stop = 0  # the stop request of a process without a block (torchrun, SLURM)


def _encode(text: str, size: int) -> bytes:
    return text.encode("utf-8", "replace")[: size - 1]


def set_activity(text: str) -> None:
    """Say what this worker is doing (e.g. ``"training: global step 12"``); the Executor
    names it when the worker gets stuck. Does nothing outside an Executor worker."""
    if _block is not None:
        _block.activity = _encode(text, _ACTIVITY_BYTES)
        _block.activity_since = time.monotonic()


def begin_rpc(name: str) -> None:
    """Record the RPC this worker now runs (and forget the previous activity)."""
    if _block is not None:
        _block.rpc = _encode(name, _RPC_BYTES)
        set_activity("")


def stop_requested() -> int:
    """The signal number of a pending stop request (``SIGTERM``, ``SIGINT``), else 0."""
    return _block.stop_signal if _block is not None else _local_stop


def request_stop(signum: int) -> None:
    """Ask this process's training loop to save and stop (first request wins)."""
    global _local_stop
    if _block is not None:
        if not _block.stop_signal:
            _block.stop_signal = int(signum)
    elif not _local_stop:
        _local_stop = int(signum)


def _on_sigterm(signum: int, frame: Any) -> None:
    if os.getpid() != _owner_pid:  # a forked child (data loader worker): die as usual
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        return
    request_stop(signum)


def catch_sigterm() -> None:
    """Make ``SIGTERM`` a stop request in this process instead of its end (main thread
    only; SLURM sends it to every process of a job before it kills them)."""
    global _owner_pid
    if threading.current_thread() is threading.main_thread():
        _owner_pid = _owner_pid or os.getpid()
        signal.signal(signal.SIGTERM, _on_sigterm)


@dataclass
class LivenessLink:
    """What a worker needs of the liveness machinery; a spawn argument of its process."""

    blocks: Any  # the RawArray of every worker's _Block
    rank: int
    stacks_fd: int
    interval: float

    def __reduce__(self):
        from multiprocessing.reduction import DupFd  # pickled only while spawning

        args = (self.blocks, self.rank, DupFd(self.stacks_fd), self.interval)
        return (_rebuild_link, args)

    def start(self) -> None:
        """In the worker: attach to the block, arm the stack dump, start the heartbeat."""
        global _block, _owner_pid
        _block = self.blocks[self.rank]
        _owner_pid = os.getpid()
        faulthandler.register(STACK_SIGNAL, file=self.stacks_fd, all_threads=True)
        threading.Thread(
            target=_beat, args=(_block, self.interval), name="vidpar-heartbeat", daemon=True
        ).start()


def _rebuild_link(blocks: Any, rank: int, dup: Any, interval: float) -> LivenessLink:
    return LivenessLink(blocks, rank, dup.detach(), interval)


def _beat(block: _Block, interval: float) -> None:
    while True:
        block.beats += 1
        time.sleep(interval)


# The Executor's side -------------------------------------------------------------------

_STATES = {
    "T": "stopped (SIGSTOP or SIGTSTP)",
    "t": "stopped by a debugger",
    "D": "blocked in the kernel (uninterruptible I/O)",
    "S": "asleep while nothing else in it can run (the GIL held while waiting?)",
    "R": "running",
    "Z": "a zombie (it has died)",
}


def process_state(pid: int) -> tuple[str, float] | None:
    """``(state letter, CPU seconds)`` of a process from ``/proc``; ``None`` if unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    return fields[0].decode(), (int(fields[11]) + int(fields[12])) / ticks


def thread_states(pid: int) -> dict[str, tuple[str, int]] | None:
    """``{tid: (state letter, voluntary context switches)}`` of the threads of ``pid``
    (``/proc/PID/task/TID/status``); ``None`` where the kernel does not say."""
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    states = {}
    for tid in threads:
        try:
            with open(f"/proc/{pid}/task/{tid}/status", "rb") as status:
                fields = dict(line.split(b":", 1) for line in status.read().splitlines())
            state = fields[b"State"].split()[0].decode()
            states[tid] = (state, int(fields[b"voluntary_ctxt_switches"]))
        except (OSError, KeyError, ValueError, IndexError):
            continue  # the thread ended meanwhile
    return states or None


@dataclass
class _Probe:
    """What a look saw of a silent worker: its CPU time and its threads' states."""

    cpu: float  # CPU seconds of the whole process
    threads: dict[str, tuple[str, int]] | None  # from thread_states

    def busy_since(self, earlier: _Probe) -> bool:
        """Whether a thread stayed runnable since ``earlier`` (state ``R`` then and now,
        no sleep in between), however long it waited for a CPU; without per-thread states:
        whether the process got any CPU time."""
        if self.threads is None or earlier.threads is None:
            return self.cpu > earlier.cpu
        return any(
            state == "R" and earlier.threads.get(tid) == (state, switches)
            for tid, (state, switches) in self.threads.items()
        )


@dataclass
class Stall:
    """A worker found stuck: ``silent_s`` seconds without a heartbeat, in ``state``."""

    rank: int
    silent_s: float
    state: str


@dataclass
class _Seen:
    beats: int
    since: float  # when ``beats`` was first seen (this process's monotonic clock)
    probe: _Probe | None = None  # the last look since the silence passed the timeout


class Monitor:
    """The Executor's view of its workers' blocks, and their stacks files.

    ``timeout``: seconds without a heartbeat after which a worker that is not busy (see
    the module's description) is stuck (``None``: never). Heartbeats come every
    ``interval`` seconds.
    """

    def __init__(self, ctx: Any, world_size: int, timeout: float | None) -> None:
        if timeout is not None and not timeout > 0:
            raise ValueError(f"heartbeat_timeout_s must be positive or None, got {timeout}")
        self.timeout = timeout
        self.interval = 1.0 if timeout is None else min(1.0, timeout / 10)
        self.blocks = ctx.RawArray(_Block, world_size)
        # Unnamed files (nothing to clean up after a crash), closed by close().
        self._files = [tempfile.TemporaryFile() for _ in range(world_size)]  # noqa: SIM115
        self._seen: dict[int, _Seen] = {}
        self._last_look = 0.0

    def link(self, rank: int) -> LivenessLink:
        return LivenessLink(self.blocks, rank, self._files[rank].fileno(), self.interval)

    def request_stop(self, signum: int) -> None:
        """Set a stop request in every worker's block (the training loop reads it)."""
        for block in self.blocks:
            if not block.stop_signal:
                block.stop_signal = int(signum)

    # Watching ------------------------------------------------------------------------

    def watch(self, ranks: list[int]) -> None:
        """Start watching ``ranks`` afresh (a call begins, or this process was paused)."""
        now = self._last_look = time.monotonic()
        self._seen = {r: _Seen(self.blocks[r].beats, now) for r in ranks}

    def _look(self, ranks: list[int]) -> float:
        """Update the beats seen; the current time."""
        now = time.monotonic()
        if now - self._last_look > max(5.0, 5 * self.interval):
            self.watch(ranks)  # this process did not run for a while: judge nobody on it
        self._last_look = now
        for rank in ranks:
            beats = self.blocks[rank].beats
            seen = self._seen.get(rank)
            if seen is None or beats != seen.beats or beats == 0:  # 0: not started yet
                self._seen[rank] = _Seen(beats, now)
        return now

    def find_stuck(self, ranks: list[int], pids: list[int]) -> Stall | None:
        """The first of ``ranks`` that is stuck, if any (call every ``interval`` s)."""
        if self.timeout is None:
            return None
        now = self._look(ranks)
        for rank in ranks:
            seen = self._seen[rank]
            silent = now - seen.since
            if silent < self.timeout:
                continue
            status = process_state(pids[rank])
            if status is None:
                continue  # gone: the Executor sees its end
            state, cpu = status
            probe = _Probe(cpu, thread_states(pids[rank]))
            if state in "Tt" or (seen.probe is not None and not probe.busy_since(seen.probe)):
                return Stall(rank, silent, _STATES.get(state, f"in state {state}"))
            seen.probe = probe  # busy (holding the GIL?) or first look: look again next time
        return None

    def silent(self, ranks: list[int], pids: list[int]) -> list[int]:
        """Those of ``ranks`` with a stopped process or no heartbeat for 3 intervals."""
        now = self._look(ranks)
        found = []
        for rank in ranks:
            status = process_state(pids[rank])
            stopped = status is not None and status[0] in "Tt"
            if stopped or now - self._seen[rank].since > 3 * self.interval:
                found.append(rank)
        return found

    def state(self, pid: int) -> str:
        status = process_state(pid)
        return "unknown" if status is None else _STATES.get(status[0], f"in state {status[0]}")

    def activity(self, rank: int) -> str:
        """What ``rank`` said it was doing: its RPC and activity."""
        block = self.blocks[rank]
        rpc = block.rpc.decode("utf-8", "replace")
        text = f"in collective_rpc({rpc!r})" if rpc else "idle"
        activity = block.activity.decode("utf-8", "replace")
        if activity:
            text += f", {activity} (for {time.monotonic() - block.activity_since:.0f} s)"
        return text

    # Reports -------------------------------------------------------------------------

    def stuck_error(self, stall: Stall, pending: list[int], pids: list[int]) -> WorkerStuckError:
        """The error for a stuck rank, with its activity, its stacks and the others'."""
        pid = pids[stall.rank]
        activity = self.activity(stall.rank)
        stacks = self.dump_stacks(stall.rank, pid)
        others = "; ".join(f"rank {r} {self.activity(r)}" for r in pending if r != stall.rank)
        return WorkerStuckError(
            stall.rank, pid, stall.silent_s, stall.state, activity, stacks, others
        )

    def timeout_report(self, missing: list[int], pids: list[int]) -> tuple[list[int], str]:
        """The ranks of ``missing`` that stopped responding (all of them if none can be
        told apart) and what was seen of them (state, activity, Python stacks)."""
        silent = self.silent(missing, pids) if len(pids) == len(self.blocks) else []
        details = []
        for rank in silent:
            pid = pids[rank]
            state, stacks = self.state(pid), self.dump_stacks(rank, pid)
            details.append(
                f"rank {rank} (pid {pid}) is {state}, {self.activity(rank)}; its Python "
                f"stacks:\n{stacks.strip() or '(it did not dump them)'}"
            )
        return silent or missing, "\n".join(details)

    # Stacks --------------------------------------------------------------------------

    def dump_stacks(self, rank: int, pid: int, wait_s: float = 3.0) -> str:
        """Ask ``rank`` for its Python stacks (waking it first if it is stopped) and return
        what it wrote within ``wait_s`` s."""
        fd = self._files[rank].fileno()
        start = size = os.fstat(fd).st_size
        try:
            os.kill(pid, signal.SIGCONT)
            os.kill(pid, STACK_SIGNAL)
        except OSError:
            return ""
        deadline = time.monotonic() + wait_s
        changed = time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.05)
            now_size = os.fstat(fd).st_size
            if now_size != size:
                size, changed = now_size, time.monotonic()
            elif size > start and time.monotonic() - changed > 0.3:
                break
        return os.pread(fd, size - start, start).decode("utf-8", "replace")

    def close(self) -> None:
        for file in self._files:
            with contextlib.suppress(OSError):
                file.close()
