"""Real multi-process worlds for tests: gloo on CPU, reused across tests, hard timeouts.

A :class:`World` keeps ``size`` processes (started as the Executor starts its workers, forked
from a server that has torch loaded) joined in one torch.distributed world.
``world.run(fn, *args, layout=config)`` runs the module-level function ``fn`` on every rank
(inside that layout's groups when ``layout`` is given) and returns the results in rank
order. A rank that raises fails the call with its traceback; a hang or a dead process
fails it after ``timeout`` seconds at most, and the world is rebuilt for the next call.
"""

from __future__ import annotations

import contextlib
import socket
import time
import traceback
from multiprocessing.connection import Connection, wait
from typing import Any

from vidpar.config import ParallelConfig
from vidpar.executor.start_method import worker_context

#: Time a world waits for the other ranks once one rank has failed.
FAILURE_GRACE_S = 5.0


def get_free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago (tests' own rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class WorldError(AssertionError):
    """A rank failed, died or hung."""


def _serve(rank: int, size: int, port: int, conn: Connection) -> None:
    import torch

    torch.set_num_threads(1)
    from vidpar.distributed import state as ps

    ps.init_distributed_environment(
        world_size=size,
        rank=rank,
        local_rank=rank,
        init_method=f"tcp://127.0.0.1:{port}",
        backend="gloo",
    )
    conn.send(("ready", None))
    while True:
        message = conn.recv()
        if message is None:
            break
        fn, args, kwargs, layout = message
        try:
            if layout is None:
                result = fn(*args, **kwargs)
            else:
                ps.initialize_model_parallel(layout)
                try:
                    result = fn(*args, **kwargs)
                finally:
                    ps.destroy_model_parallel()
            conn.send(("ok", result))
        except BaseException:
            conn.send(("error", traceback.format_exc()))
    ps.destroy_distributed_environment()


class World:
    """``size`` processes in one gloo world, ready to run functions."""

    def __init__(self, size: int, start_timeout: float = 120.0) -> None:
        self.size = size
        ctx = worker_context()
        port = get_free_port()
        self._conns: list[Connection] = []
        self._procs = []
        for rank in range(size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_serve, args=(rank, size, port, child), daemon=True)
            proc.start()
            child.close()
            self._conns.append(parent)
            self._procs.append(proc)
        self._collect(start_timeout, "start")

    @property
    def alive(self) -> bool:
        return bool(self._procs) and all(p.is_alive() for p in self._procs)

    def run(
        self,
        fn,
        *args: Any,
        layout: ParallelConfig | None = None,
        timeout: float = 120.0,
        **kwargs: Any,
    ) -> list[Any]:
        """``fn(*args, **kwargs)`` on every rank; results in rank order."""
        for conn in self._conns:
            conn.send((fn, args, kwargs, layout))
        return self._collect(timeout, getattr(fn, "__name__", str(fn)))

    def _collect(self, timeout: float, what: str) -> list[Any]:
        results: dict[int, tuple[str, Any]] = {}
        deadline = time.monotonic() + timeout
        by_conn = {c: r for r, c in enumerate(self._conns)}
        by_sentinel = {p.sentinel: r for r, p in enumerate(self._procs)}
        while len(results) < self.size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            pending = [c for c, r in by_conn.items() if r not in results]
            sentinels = [s for s, r in by_sentinel.items() if r not in results]
            for ready in wait(pending + sentinels, timeout=remaining):
                if ready in by_conn:
                    results[by_conn[ready]] = ready.recv()
                elif by_sentinel[ready] not in results:
                    rank = by_sentinel[ready]
                    results[rank] = ("died", f"exit code {self._procs[rank].exitcode}")
            if any(status != "ok" and status != "ready" for status, _ in results.values()):
                deadline = min(deadline, time.monotonic() + FAILURE_GRACE_S)
        failures = [(r, s, v) for r, (s, v) in sorted(results.items()) if s not in ("ok", "ready")]
        missing = [r for r in range(self.size) if r not in results]
        if failures or missing:
            self.close()
            lines = [f"{what} failed in a world of {self.size}:"]
            shown: dict[str, int] = {}
            for r, s, v in failures:
                if v in shown:
                    lines.append(f"--- rank {r} {s}: the same as rank {shown[v]}")
                else:
                    shown[v] = r
                    lines.append(f"--- rank {r} {s}:\n{v}")
            if missing:
                lines.append(f"--- ranks {missing} did not answer within {timeout:.0f} s (hang)")
            raise WorldError("\n".join(lines))
        return [results[r][1] for r in range(self.size)]

    def close(self) -> None:
        """Stop every process (politely, then by force)."""
        for conn in self._conns:
            with contextlib.suppress(BrokenPipeError, OSError):
                conn.send(None)
        deadline = time.monotonic() + 5
        for proc in self._procs:
            proc.join(timeout=max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join()
        self._procs.clear()
        self._conns.clear()


class Worlds:
    """One live :class:`World` per size, rebuilt when a failure closed it."""

    def __init__(self) -> None:
        self._worlds: dict[int, World] = {}

    def __call__(self, size: int) -> World:
        world = self._worlds.get(size)
        if world is None or not world.alive:
            world = self._worlds[size] = World(size)
        return world

    def close(self) -> None:
        for world in self._worlds.values():
            world.close()
        self._worlds.clear()
