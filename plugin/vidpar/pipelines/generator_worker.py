"""GeneratorWorker: an Executor worker that keeps LoRA adapters around its model and knows
its replica's share of the videos."""

from __future__ import annotations

from typing import Any

from vidpar.executor import Worker, rpc, wire
from vidpar.nn.lora import LoraManager


def dp_slice(num_items: int, dp_size: int, dp_rank: int) -> slice:
    """The contiguous share of ``num_items`` videos that data-parallel rank ``dp_rank``
    generates (the first ``num_items % dp_size`` ranks take one more)."""
    base, extra = divmod(num_items, dp_size)
    start = dp_rank * base + min(dp_rank, extra)
    return slice(start, start + base + (dp_rank < extra))


class GeneratorWorker(Worker):
    """A :class:`~vidpar.executor.Worker` with LoRA RPCs (:mod:`vidpar.nn.lora`), for any
    payload whose sharded weights follow the ``tensor_parallel_dim`` contract."""

    _lora_manager: LoraManager | None = None

    def dp_share(self, num_items: int) -> slice:
        """The videos of ``num_items`` that this rank's dp replica generates."""
        dp_rank = self.parallel.coordinates(self.rank)["dp"]
        return dp_slice(num_items, self.parallel.dp, dp_rank)

    def _lora(self) -> LoraManager:
        """This worker's manager, created on first use (and again if the payload was
        replaced)."""
        manager = self._lora_manager
        if manager is None or manager.model is not self.require_model():
            manager = self._lora_manager = LoraManager(self.model)
        return manager

    @rpc
    def wire_times(self) -> dict[str, float]:
        """This worker's :data:`vidpar.executor.wire.last_times`: called right after an RPC,
        its ``encode_*`` stamps are those of that RPC's reply."""
        return dict(wire.last_times)

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
