"""Halo exchange: a tensor split in rows over a group, padded with its neighbours' rows.

A convolution over a tensor whose dimension ``dim`` is split in consecutive blocks over
the ranks of a group (rank 0 holds the first rows) needs, at each block border, the rows
of the neighbouring block that its kernel reaches. :func:`halo_pad` is ``F.pad`` for a
block: the padding of ``dim`` holds the neighbouring ranks' rows (zeros at the two ends
of the whole tensor, where a convolution's zero padding would be), so that the
convolution of the padded blocks is exactly the block of the whole convolution.
:func:`gather_rows` is the way back: the blocks, of unequal sizes, joined in rank order
on every rank.

The point-to-point messages go through the group's :class:`GroupCoordinator` (so
telemetry sees them), in two phases per direction: even ranks send first while odd ranks
receive, then the other way round, so blocking sends never wait on each other.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from vidpar.distributed.group import GroupCoordinator

__all__ = ["gather_rows", "halo_pad", "split_sizes"]


def split_sizes(total: int, parts: int) -> list[int]:
    """``total`` rows in ``parts`` consecutive blocks, the first ``total % parts`` one
    row longer."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def _pass_rows(
    group: GroupCoordinator, rows: torch.Tensor, shape: torch.Size, forward: bool
) -> torch.Tensor | None:
    """Send ``rows`` (nothing when empty) to the next rank (``forward``) or the previous one, and return what
    the opposite neighbour sent (``None`` at the end of the chain). ``shape`` is the
    shape of the rows that arrive."""
    rank, size = group.rank_in_group, group.world_size
    dst = rank + 1 if forward else rank - 1
    src = rank - 1 if forward else rank + 1
    sends = 0 <= dst < size and rows.numel() > 0
    receives = 0 <= src < size and rows.numel() > 0
    received = None
    # The chain position decides the order: senders on even positions go first.
    position = rank if forward else size - 1 - rank
    for phase in (0, 1):
        if sends and position % 2 == phase:
            group.send(rows.contiguous(), dst)
        if receives and position % 2 != phase:
            received = group.recv(shape, rows.dtype, src)
    return received


def halo_pad(
    x: torch.Tensor, group: GroupCoordinator, dim: int, pad: Sequence[int]
) -> torch.Tensor:
    """``F.pad(x, pad)`` (zeros; ``pad`` as ``F.pad`` takes it, last dim first) where the
    padding of ``dim`` (this rank's block of rows) holds the previous rank's last rows
    before the block and the next rank's first rows after it; zeros where there is no
    neighbour. One padded copy, as ``F.pad`` makes; every block must have at least as
    many rows as the padding of ``dim`` asks."""
    dim = dim % x.dim()
    pairs = [(pad[i], pad[i + 1]) for i in range(0, len(pad), 2)]
    before, after = pairs[x.dim() - 1 - dim] if x.dim() - 1 - dim < len(pairs) else (0, 0)
    if group.world_size == 1 or before == after == 0:
        return F.pad(x, list(pad))
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

    # My last rows are the next rank's rows before; my first rows the previous rank's after.
    top = _pass_rows(group, x.narrow(dim, rows - before, before), halo_shape(before), True)
    bottom = _pass_rows(group, x.narrow(dim, 0, after), halo_shape(after), False)
    out = F.pad(x, list(pad))
    inner = out
    for d, (low, _) in enumerate(reversed(pairs)):
        d += x.dim() - len(pairs)
        if d != dim:
            inner = inner.narrow(d, low, x.shape[d])
    if top is not None:
        inner.narrow(dim, 0, before).copy_(top)
    if bottom is not None:
        inner.narrow(dim, before + rows, after).copy_(bottom)
    return out


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
