"""The parent side of a generator's workers: the one place a generator starts its
:class:`~vidpar.executor.Executor`, reads the replicas' results, answers the LoRA calls
and closes."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Self

from vidpar.config import ParallelConfig
from vidpar.executor import Executor
from vidpar.executor.executor import HEARTBEAT_TIMEOUT_S
from vidpar.pipelines.generator_worker import GeneratorWorker


class WorkerSession:
    """A generator whose payload runs in one :class:`~vidpar.pipelines.generator_worker.
    GeneratorWorker` per rank of ``parallel`` (``self.executor``), built there by
    ``worker_factory(worker)``; a context manager that shuts them down. A worker silent
    for ``heartbeat_timeout_s`` fails the call (see the Executor)."""

    def __init__(
        self,
        parallel: ParallelConfig,
        worker_factory: Callable[[GeneratorWorker], Any],
        devices: str | Sequence[str] = "auto",
        heartbeat_timeout_s: float | None = HEARTBEAT_TIMEOUT_S,
    ) -> None:
        self.executor = Executor(
            parallel,
            worker_factory=worker_factory,
            devices=devices,
            worker_cls=GeneratorWorker,
            heartbeat_timeout_s=heartbeat_timeout_s,
        )
        #: The collective records of the last generation on rank 0.
        self.last_records: list = []

    @property
    def parallel(self) -> ParallelConfig:
        """The layout the workers run."""
        return self.executor.parallel

    @property
    def device_type(self) -> str:
        """``"cuda"`` or ``"cpu"``: where the workers run."""
        return self.executor.devices[0].split(":")[0]

    def replica_leaders(self, results: Sequence[Any]) -> list[Any]:
        """Of one result per rank, those of each dp replica's first rank, in dp order."""
        return [results[self.parallel.rank({"dp": d})] for d in range(self.parallel.dp)]

    def merge_lora(self, name: str | None = None) -> str:
        """Fold adapter ``name`` (default: the only one set) into the weights."""
        return self.executor.collective_rpc("merge_lora", name)[0]

    def unmerge_lora(self) -> str | None:
        """Restore the base weights exactly; returns the adapter that was merged."""
        return self.executor.collective_rpc("unmerge_lora")[0]

    def close(self) -> None:
        self.executor.shutdown()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
