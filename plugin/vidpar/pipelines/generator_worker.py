"""GeneratorWorker: an Executor worker that also keeps LoRA adapters around its model."""

from __future__ import annotations

from typing import Any

from vidpar.executor import Worker, rpc
from vidpar.nn.lora import LoraManager


class GeneratorWorker(Worker):
    """A :class:`~vidpar.executor.Worker` with LoRA RPCs (:mod:`vidpar.nn.lora`), for any
    payload whose sharded weights follow the ``tensor_parallel_dim`` contract."""

    _lora_manager: LoraManager | None = None

    def _lora(self) -> LoraManager:
        """This worker's manager, created on first use (and again if the payload was
        replaced)."""
        manager = self._lora_manager
        if manager is None or manager.model is not self.require_model():
            manager = self._lora_manager = LoraManager(self.model)
        return manager

    @rpc
    def set_lora_adapter(self, name: str, path_or_state: Any) -> list[str]:
        """Load (or replace) the LoRA adapter ``name``: a dict of full factors
        ``"<weight>.lora_A"`` ``[r, in]``, ``"<weight>.lora_B"`` ``[out, r]`` and an optional
        ``"scale"``, or a ``.safetensors``/torch file of one. Returns the targeted weights."""
        return self._lora().set_adapter(name, path_or_state)

    @rpc
    def merge_lora(self, name: str | None = None) -> str:
        """Add adapter ``name`` (default: the only one set) into this rank's weight shards;
        returns its name."""
        return self._lora().merge(name)

    @rpc
    def unmerge_lora(self) -> str | None:
        """Undo :meth:`merge_lora` exactly; returns the adapter that was merged, if any."""
        return self._lora().unmerge()
