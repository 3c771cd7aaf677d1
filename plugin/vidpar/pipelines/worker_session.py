"""The parent side of a generator's workers: the LoRA calls every generator answers the
same way and the closing of its :class:`~vidpar.executor.Executor`."""

from __future__ import annotations

from typing import Self

from vidpar.executor import Executor


class WorkerSession:
    """A generator whose workers (:class:`~vidpar.pipelines.generator_worker.
    GeneratorWorker`) run in ``self.executor``; a context manager that shuts them down."""

    executor: Executor

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
