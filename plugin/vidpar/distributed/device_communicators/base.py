"""DeviceCommunicator: every collective of one group through ``torch.distributed``."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup, ReduceOp

# torch 2.13 renamed the flat-buffer collectives; older releases have only the old names.
_all_gather_flat = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)


class DeviceCommunicator:
    """Moves tensors among the ranks of one group on its device group.

    Subclasses replace individual operations with faster paths; every method keeps the
    same contract. ``rank_in_group`` indexes ``ranks``; sources and destinations are
    given as ranks in the group, not global ranks.
    """

    name = "torch"

    def __init__(
        self,
        cpu_group: ProcessGroup,
        device_group: ProcessGroup,
        ranks: list[int],
        rank_in_group: int,
        device: torch.device,
    ) -> None:
        self.cpu_group = cpu_group
        self.device_group = device_group
        self.ranks = ranks
        self.rank_in_group = rank_in_group
        self.world_size = len(ranks)
        self.device = device

    def all_reduce(
        self, tensor: torch.Tensor, op: ReduceOp.RedOpType = ReduceOp.SUM
    ) -> torch.Tensor:
        """Reduce in place across the group; returns ``tensor``."""
        dist.all_reduce(tensor, op=op, group=self.device_group)
        return tensor

    def all_gather(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Concatenate every rank's ``tensor`` along ``dim`` (rank order)."""
        dim = dim % tensor.dim()
        tensor = tensor.contiguous()
        out = tensor.new_empty((self.world_size * tensor.shape[0], *tensor.shape[1:]))
        _all_gather_flat(out, tensor, group=self.device_group)
        if dim == 0:
            return out
        return _merge_leading(out.view(self.world_size, *tensor.shape), dim)

    def gather(self, tensor: torch.Tensor, dst: int = 0, dim: int = 0) -> torch.Tensor | None:
        """Concatenation along ``dim`` on rank ``dst`` of the group; ``None`` elsewhere."""
        tensor = tensor.contiguous()
        parts = (
            [torch.empty_like(tensor) for _ in range(self.world_size)]
            if self.rank_in_group == dst
            else None
        )
        dist.gather(tensor, parts, group=self.device_group, group_dst=dst)
        return torch.cat(parts, dim=dim) if parts is not None else None

    def reduce_scatter(
        self, tensor: torch.Tensor, dim: int = 0, op: ReduceOp.RedOpType = ReduceOp.SUM
    ) -> torch.Tensor:
        """Reduce across the group, keeping this rank's equal chunk along ``dim``."""
        dim = dim % tensor.dim()
        if dim != 0:
            tensor = _split_leading(tensor, self.world_size, dim)
        tensor = tensor.contiguous()
        out_shape = (tensor.shape[0] // self.world_size, *tensor.shape[1:])
        out = tensor.new_empty(out_shape)
        _reduce_scatter_flat(out, tensor, op=op, group=self.device_group)
        if dim != 0:
            return out.squeeze(0)
        return out

    def all_to_all(self, tensor: torch.Tensor, scatter_dim: int, gather_dim: int) -> torch.Tensor:
        """Chunk ``i`` along ``scatter_dim`` goes to rank ``i``; received chunks are
        concatenated along ``gather_dim`` in rank order."""
        n = self.world_size
        scatter_dim %= tensor.dim()
        gather_dim %= tensor.dim()
        send = _split_leading(tensor, n, scatter_dim).contiguous()
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.device_group)
        # recv[j] is rank j's chunk, shaped like the input with scatter_dim divided by n.
        return _merge_leading(recv, gather_dim)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Copy rank ``src``'s ``tensor`` into every rank's ``tensor``; returns it."""
        dist.broadcast(tensor, group=self.device_group, group_src=src)
        return tensor

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        """Send ``tensor`` to rank ``dst`` of the group."""
        dist.send(tensor.contiguous(), group=self.device_group, group_dst=dst)

    def recv(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        """Receive into ``tensor`` from rank ``src`` of the group; returns it."""
        dist.recv(tensor, group=self.device_group, group_src=src)
        return tensor


def _split_leading(tensor: torch.Tensor, parts: int, dim: int) -> torch.Tensor:
    """View ``tensor`` as ``[parts, ...]`` where chunk ``i`` is the i-th chunk along ``dim``."""
    shape = list(tensor.shape)
    if shape[dim] % parts:
        raise ValueError(f"dimension {dim} of size {shape[dim]} is not divisible by {parts}")
    shape[dim : dim + 1] = [parts, shape[dim] // parts]
    return tensor.reshape(shape).movedim(dim, 0)


def _merge_leading(tensor: torch.Tensor, dim: int) -> torch.Tensor:
    """Inverse of :func:`_split_leading`: fold the leading ``[parts]`` into ``dim``."""
    parts, rest = tensor.shape[0], list(tensor.shape[1:])
    rest[dim] *= parts
    return tensor.movedim(0, dim).reshape(rest)
