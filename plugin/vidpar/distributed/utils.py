"""Small helpers shared by the distributed code: sizes, splitting, padding, objects, ports."""

from __future__ import annotations

import pickle
import socket
from typing import Any

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


def shard_sizes(length: int, num_partitions: int) -> list[int]:
    """Lengths of the shards of ``length`` items padded up to a multiple of the parts.

    Every shard has ``ceil(length / num_partitions)`` slots; the padding sits at the end, so
    the last shards hold fewer real items (possibly none).
    """
    per_shard = -(-length // num_partitions)
    return [max(0, min(per_shard, length - i * per_shard)) for i in range(num_partitions)]


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


def serialize_object(obj: Any) -> bytes:
    """Bytes for a control message (pickle protocol 5, which keeps large buffers flat)."""
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def deserialize_object(data: bytes | bytearray | memoryview) -> Any:
    """Inverse of :func:`serialize_object`."""
    return pickle.loads(data)


def get_free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def tcp_init_method(host: str = "127.0.0.1", port: int | None = None) -> str:
    """A ``tcp://`` rendezvous address for ``torch.distributed.init_process_group``."""
    return f"tcp://{host}:{port or get_free_port(host)}"
