"""Worker processes, one per device, driven by RPCs from the caller's process.

:class:`Executor` starts the workers and runs :meth:`Executor.collective_rpc` on them;
:class:`Worker` is what runs inside each one (subclass it and mark new RPCs with
:func:`rpc`).
"""

from vidpar.executor.executor import (
    Executor,
    ExecutorError,
    RemoteError,
    RpcTimeoutError,
    WorkerDiedError,
)
from vidpar.executor.worker import Worker, WorkerSpec, rpc

__all__ = [
    "Executor",
    "ExecutorError",
    "RemoteError",
    "RpcTimeoutError",
    "Worker",
    "WorkerDiedError",
    "WorkerSpec",
    "rpc",
]
