"""DeviceCommunicator: every collective of one group through ``torch.distributed``."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup, ReduceOp

# torch 2.13 renamed the flat-buffer collectives; older releases have only the old names.
_dist_all_gather_flat = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
_dist_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)


class DeviceCommunicator:
    """Moves tensors among the ranks of one group on its device group.

    The public methods shape tensors and call the flat primitives below them
    (``_all_reduce``, ``_all_gather_into``...), which move contiguous buffers; subclasses
    replace primitives with faster paths and keep every contract. ``rank_in_group``
    indexes ``ranks``; sources and destinations are ranks in the group, not global ranks.
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
        self._all_reduce(tensor, op)
        return tensor

    def all_gather(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Concatenate every rank's ``tensor`` along ``dim`` (rank order)."""
        dim = dim % tensor.dim()
        tensor = tensor.contiguous()
        out = tensor.new_empty((self.world_size * tensor.shape[0], *tensor.shape[1:]))
        self._all_gather_into(out, tensor)
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
        self._reduce_scatter_into(out, tensor, op)
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
        self._all_to_all_into(recv, send)
        # recv[j] is rank j's chunk, shaped like the input with scatter_dim divided by n.
        return _merge_leading(recv, gather_dim)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Copy rank ``src``'s ``tensor`` into every rank's ``tensor``; returns it."""
        self._broadcast(tensor, src)
        return tensor

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        """Send ``tensor`` to rank ``dst`` of the group."""
        self._send(tensor.contiguous(), dst)

    def recv(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        """Receive into ``tensor`` from rank ``src`` of the group; returns it."""
        self._recv(tensor, src)
        return tensor

    def close(self, abort: bool = False) -> None:
        """Release what this communicator holds beyond torch's groups (idempotent);
        ``abort=True`` on a death path: never wait for peers. Nothing to release here."""

    # Flat primitives on contiguous buffers: what subclasses replace ------------------

    def _all_reduce(self, tensor: torch.Tensor, op: ReduceOp.RedOpType) -> None:
        dist.all_reduce(tensor, op=op, group=self.device_group)

    def _all_gather_into(self, out: torch.Tensor, tensor: torch.Tensor) -> None:
        _dist_all_gather_flat(out, tensor, group=self.device_group)

    def _reduce_scatter_into(
        self, out: torch.Tensor, tensor: torch.Tensor, op: ReduceOp.RedOpType
    ) -> None:
        _dist_reduce_scatter_flat(out, tensor, op=op, group=self.device_group)

    def _all_to_all_into(self, out: torch.Tensor, tensor: torch.Tensor) -> None:
        dist.all_to_all_single(out, tensor, group=self.device_group)

    def _broadcast(self, tensor: torch.Tensor, src: int) -> None:
        dist.broadcast(tensor, group=self.device_group, group_src=src)

    def _send(self, tensor: torch.Tensor, dst: int) -> None:
        dist.send(tensor, group=self.device_group, group_dst=dst)

    def _recv(self, tensor: torch.Tensor, src: int) -> None:
        dist.recv(tensor, group=self.device_group, group_src=src)


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
