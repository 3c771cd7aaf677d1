"""Halo exchange: a tensor split in rows over a group, padded with its neighbours' rows.

A convolution over a tensor whose dimension ``dim`` is split in consecutive blocks over
the ranks of a group (rank 0 holds the first rows) needs, at each block border, the rows
of the neighbouring block that its kernel reaches. :func:`exchange_halo` pads a block
with ``before`` rows of the previous rank and ``after`` rows of the next one (zeros at
the two ends of the whole tensor, where a convolution's zero padding would be), so that
the convolution of the padded blocks, without padding along ``dim``, is exactly the
block of the whole convolution. :func:`gather_rows` is the way back: the blocks, of
unequal sizes, joined in rank order on every rank.

The point-to-point messages go through the group's :class:`GroupCoordinator` (so
telemetry sees them), in two phases per direction: even ranks send first while odd ranks
receive, then the other way round, so blocking sends never wait on each other.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vidpar.distributed.group import GroupCoordinator

__all__ = ["exchange_halo", "gather_rows", "split_sizes"]


def split_sizes(total: int, parts: int) -> list[int]:
    """``total`` rows in ``parts`` consecutive blocks, the first ``total % parts`` one
    row longer."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def _pass_rows(
    group: GroupCoordinator, rows: torch.Tensor, shape: torch.Size, forward: bool
) -> torch.Tensor | None:
    """Send ``rows`` to the next rank (``forward``) or the previous one, and return what
    the opposite neighbour sent (``None`` at the end of the chain). ``shape`` is the
    shape of the rows that arrive."""
    rank, size = group.rank_in_group, group.world_size
    dst = rank + 1 if forward else rank - 1
    src = rank - 1 if forward else rank + 1
    sends = 0 <= dst < size
    receives = 0 <= src < size
    received = None
    # The chain position decides the order: senders on even positions go first.
    position = rank if forward else size - 1 - rank
    for phase in (0, 1):
        if sends and position % 2 == phase:
            group.send(rows.contiguous(), dst)
        if receives and position % 2 != phase:
            received = group.recv(shape, rows.dtype, src)
    return received


def exchange_halo(
    x: torch.Tensor, group: GroupCoordinator, dim: int, before: int, after: int
) -> torch.Tensor:
    """``x`` (this rank's block along ``dim``) with ``before`` rows of the previous rank's
    block above it and ``after`` rows of the next rank's below it; zeros where there is no
    neighbour. Every rank's block must have at least ``max(before, after)`` rows."""
    if before == 0 and after == 0:
        return x
    dim = dim % x.dim()
    if group.world_size == 1:
        pad = [0, 0] * (x.dim() - dim - 1) + [before, after]
        return F.pad(x, pad)
    rows = x.shape[dim]
    if rows < max(before, after):
        raise ValueError(
            f"a block of {rows} rows cannot lend a halo of {max(before, after)} rows; "
            "give every rank more rows"
        )

    def halo_shape(count: int) -> torch.Size:
        shape = list(x.shape)
        shape[dim] = count
        return torch.Size(shape)

    parts = []
    if before:
        # My last rows are the next rank's "before" halo.
        top = _pass_rows(group, x.narrow(dim, rows - before, before), halo_shape(before), True)
        parts.append(top if top is not None else x.new_zeros(halo_shape(before)))
    parts.append(x)
    if after:
        # My first rows are the previous rank's "after" halo.
        bottom = _pass_rows(group, x.narrow(dim, 0, after), halo_shape(after), False)
        parts.append(bottom if bottom is not None else x.new_zeros(halo_shape(after)))
    return torch.cat(parts, dim)


def gather_rows(
    x: torch.Tensor, group: GroupCoordinator, dim: int, sizes: list[int]
) -> torch.Tensor:
    """Every rank's block along ``dim`` (rank ``i``'s has ``sizes[i]`` rows) joined in rank
    order, on every rank: one all-gather of blocks padded to the longest."""
    if group.world_size == 1:
        return x
    dim = dim % x.dim()
    longest = max(sizes)
    if x.shape[dim] < longest:
        pad = [0, 0] * (x.dim() - dim - 1) + [0, longest - x.shape[dim]]
        x = F.pad(x, pad)
    gathered = group.all_gather(x.contiguous(), dim)
    if all(s == longest for s in sizes):
        return gathered
    blocks = gathered.split(longest, dim)
    return torch.cat([b.narrow(dim, 0, s) for b, s in zip(blocks, sizes, strict=True)], dim)
