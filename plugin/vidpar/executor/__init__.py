"""Worker processes, one per device, driven by RPCs from the caller's process.

:class:`Executor` starts the workers and runs :meth:`Executor.collective_rpc` on them;
:class:`Worker` is what runs inside each one (subclass it and mark new RPCs with
:func:`rpc`). :mod:`vidpar.executor.liveness` is how a worker says what it is doing
(:func:`~vidpar.executor.liveness.set_activity`) and learns that it should stop
(:func:`~vidpar.executor.liveness.stop_requested`).
"""

from vidpar.executor.errors import (
    ExecutorError,
    RemoteError,
    RpcTimeoutError,
    WorkerDiedError,
    WorkerStuckError,
)
from vidpar.executor.executor import Executor
from vidpar.executor.worker import Worker, WorkerSpec, rpc

__all__ = [
    "Executor",
    "ExecutorError",
    "RemoteError",
    "RpcTimeoutError",
    "Worker",
    "WorkerDiedError",
    "WorkerSpec",
    "WorkerStuckError",
    "rpc",
]
