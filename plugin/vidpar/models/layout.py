"""The groups of the current layout, as the model adapters see them.

Every group lookup of :mod:`vidpar.models` goes through :func:`_current_layout`, so the
registry behind it can change in one place.
"""

from __future__ import annotations

from dataclasses import dataclass

from vidpar.distributed.parallel_state import GroupCoordinator, model_parallel_is_initialized
from vidpar.nn.linear import resolve_group

__all__ = ["Layout"]


@dataclass(frozen=True)
class Layout:
    """The groups a parallelised model uses: heads and FFN over ``tp``, tokens over ``sp``
    (``ulysses`` × ``ring``)."""

    tp: GroupCoordinator
    sp: GroupCoordinator
    ulysses: GroupCoordinator
    ring: GroupCoordinator

    def describe(self) -> str:
        """E.g. ``tp2 × ulysses2 × ring1``."""
        return (
            f"tp{self.tp.world_size} × ulysses{self.ulysses.world_size} × "
            f"ring{self.ring.world_size}"
        )


def _current_layout() -> Layout | None:
    """The current layout's groups, or ``None`` outside any layout."""
    if not model_parallel_is_initialized():
        return None
    return Layout(*(resolve_group(name) for name in ("tp", "sp", "ulysses", "ring")))
