"""Small helpers shared by the distributed code: sizes, splitting, padding."""

from __future__ import annotations

import torch


def divide(numerator: int, denominator: int) -> int:
    """Exact integer division; raises ``ValueError`` naming the numbers otherwise."""
    if denominator <= 0 or numerator % denominator:
        raise ValueError(f"{numerator} is not divisible by {denominator}")
    return numerator // denominator


def split_tensor_along_dim(
    tensor: torch.Tensor, num_partitions: int, dim: int = -1, contiguous: bool = False
) -> tuple[torch.Tensor, ...]:
    """Split ``tensor`` into ``num_partitions`` equal views along ``dim``."""
    size = divide(tensor.shape[dim], num_partitions)
    parts = torch.split(tensor, size, dim=dim)
    return tuple(p.contiguous() for p in parts) if contiguous else parts


def pad_to_multiple(tensor: torch.Tensor, multiple: int, dim: int) -> tuple[torch.Tensor, int]:
    """Zero-pad ``tensor`` at the end of ``dim`` to a multiple of ``multiple``.

    Returns the padded tensor and the number of padding entries added (0: no copy made).
    """
    pad = (-tensor.shape[dim]) % multiple
    if pad == 0:
        return tensor, 0
    shape = list(tensor.shape)
    shape[dim] = pad
    return torch.cat([tensor, tensor.new_zeros(shape)], dim=dim), pad


def unpad(tensor: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """The first ``length`` entries of ``tensor`` along ``dim`` (a view)."""
    return tensor if tensor.shape[dim] == length else tensor.narrow(dim, 0, length)


def split_sizes(total: int, parts: int) -> tuple[int, ...]:
    """``total`` whole items (heads) over ``parts`` ranks, as evenly as they go: the first
    ``total % parts`` ranks hold one more."""
    base, extra = divmod(total, parts)
    return tuple(base + (rank < extra) for rank in range(parts))
