"""Splitting and padding."""

from __future__ import annotations

import pytest
import torch

from vidpar.distributed.utils import divide, pad_to_multiple, split_tensor_along_dim, unpad


def test_divide() -> None:
    assert divide(12, 4) == 3
    with pytest.raises(ValueError, match="13 is not divisible by 4"):
        divide(13, 4)


@pytest.mark.parametrize("dim", [0, 1, -1])
def test_split_along_any_dim(dim: int) -> None:
    x = torch.arange(4 * 6 * 8).reshape(4, 6, 8)
    parts = split_tensor_along_dim(x, 2, dim, contiguous=True)
    assert len(parts) == 2 and all(p.is_contiguous() for p in parts)
    assert torch.equal(torch.cat(parts, dim), x)
    with pytest.raises(ValueError):
        split_tensor_along_dim(x, 5, dim)


@pytest.mark.parametrize(("length", "parts"), [(8, 4), (7, 4), (5, 2), (1, 4), (9, 8)])
def test_padding_round_trip(length: int, parts: int) -> None:
    x = torch.randn(2, length, 3)
    padded, pad = pad_to_multiple(x, parts, dim=1)
    assert padded.shape[1] % parts == 0 and pad == padded.shape[1] - length
    assert torch.equal(padded[:, length:], torch.zeros(2, pad, 3))
    assert torch.equal(unpad(padded, length, dim=1), x)


def test_no_copy_when_already_a_multiple() -> None:
    x = torch.randn(4, 8)
    padded, pad = pad_to_multiple(x, 4, dim=1)
    assert pad == 0 and padded is x
