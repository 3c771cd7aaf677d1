"""Parallel sizes, their validation, and the rank layout every group is built from.

The world is laid out as ``dp × cfg × ring × ulysses × tp`` with tp varying fastest
(neighbouring ranks carry the chattiest traffic) and dp slowest. Every group is the set
of ranks that differ only in the group's own coordinates; ``sp`` varies ring and ulysses.
Everything here is pure Python, so the layout is tested without processes.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace

#: The layout's dimension names, slowest-varying first: the one place they and their order
#: are spelled (the mesh, the groups, ``describe()`` and the CLI's usage all read it).
DIMS: tuple[str, ...] = ("dp", "cfg", "ring", "ulysses", "tp")
#: Named groups and the layout dimensions whose coordinate varies inside each of them.
GROUP_DIMS: dict[str, tuple[str, ...]] = {
    "world": DIMS,
    "tp": ("tp",),
    "ulysses": ("ulysses",),
    "ring": ("ring",),
    "sp": ("ring", "ulysses"),
    "cfg": ("cfg",),
    "dp": ("dp",),
    # Replicas of one tp shard in training: gradients are averaged over data and sequence.
    "dp_sp": ("dp", "ring", "ulysses"),
    # The ranks that share a batch (one dp replica): the VAE and the text encoder of a
    # pipeline are split over them.
    "replica": ("cfg", "ring", "ulysses", "tp"),
}


#: Named layouts, defined once: Hydra's ``parallel=<name>`` presets and Lightning's
#: ``strategy="vidpar_<name>"`` both read this table (``dp=-1``: the rest of the world).
PRESETS: dict[str, dict[str, int]] = {
    "single": {},
    "tp2": {"tp": 2},
    "sp2": {"sp": 2},
    "ring2": {"ring": 2},
    "cfg2": {"cfg": 2},
    "tp2_sp2": {"tp": 2, "sp": 2},
    "usp_2x2": {"ulysses": 2, "ring": 2},
    "sp2_dp2": {"sp": 2, "dp": 2},
    "tp2_dp2": {"tp": 2, "dp": 2},
}


def _check_positive(name: str, value: int | None) -> None:
    if value is not None and (not isinstance(value, int) or value < 1):
        raise ValueError(f"parallel size {name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class ParallelConfig:
    """Sizes of every parallel dimension.

    ``sp`` is ``ulysses × ring``: give ``sp`` alone (all of it Ulysses) or ``ulysses`` and
    ``ring``. ``dp=-1`` takes whatever the world size leaves; with no world size known it
    is 1. Invalid combinations raise ``ValueError`` naming the numbers.
    """

    tp: int = 1
    sp: int | None = None
    ulysses: int | None = None
    ring: int | None = None
    cfg: int = 1
    dp: int = -1
    world_size: int | None = None

    def __post_init__(self) -> None:
        for name in (*DIMS, "sp", "world_size"):
            if not (name == "dp" and self.dp == -1):
                _check_positive(name, getattr(self, name))
        ulysses, ring, sp = self.ulysses, self.ring, self.sp
        if ulysses is None and ring is None:
            ulysses, ring = sp or 1, 1
        elif ulysses is None:
            ulysses = sp // ring if sp else 1
        elif ring is None:
            ring = sp // ulysses if sp else 1
        if ulysses < 1 or ring < 1 or (sp is not None and ulysses * ring != sp):
            raise ValueError(
                f"sp({sp}) must equal ulysses × ring, got ulysses({self.ulysses}) and "
                f"ring({self.ring})"
            )
        sp = ulysses * ring
        model = self.tp * sp * self.cfg
        dp = self.dp
        if dp == -1:
            if self.world_size is None:
                dp = 1
            elif self.world_size % model:
                raise ValueError(
                    f"tp({self.tp}) × sp({sp}) × cfg({self.cfg}) = {model} does not divide "
                    f"world size {self.world_size}, so dp cannot be inferred"
                )
            else:
                dp = self.world_size // model
        world = model * dp
        if self.world_size is not None and world != self.world_size:
            raise ValueError(
                f"tp({self.tp}) × sp({sp}) × cfg({self.cfg}) × dp({dp}) = {world}, "
                f"but world size is {self.world_size}"
            )
        object.__setattr__(self, "_dp_inferred", self.dp == -1)
        for name, value in (("sp", sp), ("ulysses", ulysses), ("ring", ring), ("dp", dp)):
            object.__setattr__(self, name, value)
        object.__setattr__(self, "world_size", world)

    @property
    def sizes(self) -> dict[str, int]:
        """Size of every layout dimension, slowest first."""
        return {d: getattr(self, d) for d in DIMS}

    def resolve(self, world_size: int) -> ParallelConfig:
        """This layout checked against a real world size: ``self`` when it already has that
        size, else a copy with dp inferred again (when it was inferred)."""
        if world_size == self.world_size:
            return self
        dp = -1 if self._dp_inferred else self.dp
        return replace(self, sp=None, dp=dp, world_size=world_size)

    def size(self, group: str) -> int:
        """Number of ranks in one group of ``group`` (a name in ``GROUP_DIMS``)."""
        return math.prod(self.sizes[d] for d in _group_dims(group))

    def coordinates(self, rank: int) -> dict[str, int]:
        """This rank's coordinate along every layout dimension."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside a world of size {self.world_size}")
        coords = {}
        for dim in reversed(DIMS):
            rank, coords[dim] = divmod(rank, self.sizes[dim])
        return {d: coords[d] for d in DIMS}

    def rank(self, coordinates: dict[str, int]) -> int:
        """The global rank at the given coordinates (missing dimensions count as 0)."""
        rank = 0
        for dim in DIMS:
            coord = coordinates.get(dim, 0)
            if not 0 <= coord < self.sizes[dim]:
                raise ValueError(f"{dim} coordinate {coord} is outside size {self.sizes[dim]}")
            rank = rank * self.sizes[dim] + coord
        return rank

    def group_ranks(self, group: str) -> list[list[int]]:
        """Every group of ``group``: the rank lists, each sorted, ordered by lowest rank."""
        varying = set(_group_dims(group))
        fixed = [d for d in DIMS if d not in varying]
        groups = []
        for fixed_coords in itertools.product(*(range(self.sizes[d]) for d in fixed)):
            base = dict(zip(fixed, fixed_coords, strict=True))
            members = [
                self.rank(base | dict(zip(sorted(varying), c, strict=True)))
                for c in itertools.product(*(range(self.sizes[d]) for d in sorted(varying)))
            ]
            groups.append(sorted(members))
        return sorted(groups)

    def group_of(self, group: str, rank: int) -> list[int]:
        """The ranks of the ``group`` that ``rank`` belongs to, sorted."""
        varying = _group_dims(group)
        base = self.coordinates(rank)
        return sorted(
            self.rank(base | dict(zip(varying, c, strict=True)))
            for c in itertools.product(*(range(self.sizes[d]) for d in varying))
        )

    def check_heads(self, num_heads: int) -> None:
        """Attention heads are split over ulysses × tp, every rank at least one: fail
        early, naming the numbers."""
        check_heads(num_heads, ulysses=self.ulysses, tp=self.tp)

    def describe(self) -> str:
        """A one-line summary, e.g. ``dp2 × cfg1 × ring1 × ulysses2 × tp2 = 8``."""
        body = " × ".join(f"{d}{self.sizes[d]}" for d in DIMS)
        return f"{body} = {self.world_size}"


def check_heads(num_heads: int, *, ulysses: int, tp: int) -> None:
    """Raise ``ValueError`` naming the numbers unless every rank of ulysses × tp gets a
    head. Any count works otherwise: heads that do not divide split unevenly (whole
    heads, the first ranks one more)."""
    parts = ulysses * tp
    if num_heads < parts:
        raise ValueError(
            f"num_heads({num_heads}) is fewer than ulysses({ulysses}) × tp({tp}) = {parts}: "
            f"every rank needs a head; choose ulysses × tp ≤ {num_heads}, or move sequence "
            "parallelism to ring"
        )


def _group_dims(group: str) -> tuple[str, ...]:
    try:
        return GROUP_DIMS[group]
    except KeyError:
        raise ValueError(f"unknown group {group!r}; known groups: {sorted(GROUP_DIMS)}") from None
