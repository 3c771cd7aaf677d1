"""The groups of the current layout, as the model adapters see them.

Every group lookup of :mod:`vidpar.models` goes through :func:`_current_layout`, so the
registry behind it can change in one place.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from vidpar.distributed.group import GroupCoordinator
from vidpar.distributed.state import get_parallel_state, model_parallel_is_initialized

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
    state = get_parallel_state()
    return Layout(**{f.name: state.group(f.name) for f in fields(Layout)})
