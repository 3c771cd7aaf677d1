"""GroupCoordinator: one process group of the layout and the collectives it offers."""

from __future__ import annotations

from collections import deque
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup, ReduceOp

from vidpar.distributed import collective_ops, telemetry
from vidpar.distributed.device_communicators import DeviceCommunicator, create_communicator


class GroupCoordinator:
    """One process group of the layout, as seen from this process.

    Holds the group's ``ranks``, this process's ``rank_in_group``, a gloo ``cpu_group``
    for objects and control, a ``device_group`` for tensors and the ``communicator`` that
    moves them. Sources and destinations are ranks in the group. A group of one rank
    communicates nothing and returns at once: its collectives return their input, and its
    point-to-point ops are a loopback (what it sends to itself, rank 0, waits in order for
    the matching receive; receiving with nothing sent, or from another rank, is an error). Every tensor collective is timed into the
    active :mod:`~vidpar.distributed.telemetry` recorder, if any. While ``torch.compile``
    traces, all-reduce, all-gather, reduce-scatter and all-to-all become the custom ops of
    :mod:`~vidpar.distributed.collective_ops` (out of place), which run these same methods
    when the compiled graph runs.
    """

    def __init__(
        self,
        name: str,
        ranks: list[int],
        cpu_group: ProcessGroup | None,
        device_group: ProcessGroup | None,
        device: torch.device,
        communicator: str = "auto",
    ) -> None:
        self.name = name
        self.ranks = list(ranks)
        self.rank = dist.get_rank() if dist.is_initialized() else self.ranks[0]
        self.rank_in_group = self.ranks.index(self.rank)
        self.world_size = len(self.ranks)
        self.cpu_group = cpu_group
        self.device_group = device_group
        self.device = device
        self.communicator: DeviceCommunicator | None = None
        #: What a group of one sent itself and has not received yet (tensors, objects).
        self._loopback: deque[torch.Tensor] = deque()
        self._loopback_objects: deque[Any] = deque()
        #: The name this group's traceable collectives know it by.
        self.key = collective_ops.group_key(self, name)
        if self.world_size > 1:
            self.communicator = create_communicator(
                communicator, cpu_group, device_group, self.ranks, self.rank_in_group, device
            )

    def __repr__(self) -> str:
        return (
            f"GroupCoordinator({self.name}, ranks={self.ranks}, rank_in_group={self.rank_in_group})"
        )

    def close(self, abort: bool = False) -> None:
        """Release the communicator's own resources (a pynccl communicator); ``abort=True``
        on a death path, where peers may never answer. The torch groups stay."""
        if self.communicator is not None:
            self.communicator.close(abort)

    @property
    def is_first_rank(self) -> bool:
        return self.rank_in_group == 0

    @property
    def next_rank(self) -> int:
        """Rank in group of the next member, wrapping around (the ring's send direction)."""
        return (self.rank_in_group + 1) % self.world_size

    @property
    def prev_rank(self) -> int:
        """Rank in group of the previous member, wrapping around."""
        return (self.rank_in_group - 1) % self.world_size

    def _measure(self, op: str, tensor: torch.Tensor, nbytes: int | None = None):
        return telemetry.measure(op, self.name, tensor, self.world_size, nbytes)

    # Tensor collectives -------------------------------------------------------------

    def all_reduce(
        self, tensor: torch.Tensor, op: ReduceOp.RedOpType = ReduceOp.SUM
    ) -> torch.Tensor:
        """Sum (or ``op``) over the group, in place; returns ``tensor`` (a new tensor while
        ``torch.compile`` traces)."""
        if self.world_size == 1:
            return tensor
        if torch.compiler.is_compiling():
            return torch.ops.vidpar.all_reduce(tensor, self.key, op.name)
        with self._measure("all_reduce", tensor):
            return self.communicator.all_reduce(tensor, op)

    def all_gather(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Every rank's ``tensor`` concatenated along ``dim`` in rank order."""
        if self.world_size == 1:
            return tensor
        if torch.compiler.is_compiling():
            return torch.ops.vidpar.all_gather(tensor, self.key, dim)
        nbytes = tensor.numel() * tensor.element_size() * self.world_size
        with self._measure("all_gather", tensor, nbytes):
            return self.communicator.all_gather(tensor, dim)

    def gather(self, tensor: torch.Tensor, dst: int = 0, dim: int = 0) -> torch.Tensor | None:
        """Concatenation along ``dim`` on rank ``dst``; ``None`` on the others."""
        self._peer(dst, dst, "gather")
        if self.world_size == 1:
            return tensor
        nbytes = tensor.numel() * tensor.element_size() * self.world_size
        with self._measure("gather", tensor, nbytes):
            return self.communicator.gather(tensor, dst, dim)

    def reduce_scatter(
        self, tensor: torch.Tensor, dim: int = 0, op: ReduceOp.RedOpType = ReduceOp.SUM
    ) -> torch.Tensor:
        """Reduce over the group and keep this rank's equal chunk along ``dim``."""
        if self.world_size == 1:
            return tensor
        if torch.compiler.is_compiling():
            return torch.ops.vidpar.reduce_scatter(tensor, self.key, dim, op.name)
        with self._measure("reduce_scatter", tensor):
            return self.communicator.reduce_scatter(tensor, dim, op)

    def all_to_all(self, tensor: torch.Tensor, scatter_dim: int, gather_dim: int) -> torch.Tensor:
        """Send chunk ``i`` along ``scatter_dim`` to rank ``i``; concatenate what arrives
        along ``gather_dim`` (the Ulysses exchange)."""
        if self.world_size == 1:
            return tensor
        if torch.compiler.is_compiling():
            return torch.ops.vidpar.all_to_all(tensor, self.key, scatter_dim, gather_dim)
        with self._measure("all_to_all", tensor):
            return self.communicator.all_to_all(tensor, scatter_dim, gather_dim)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Rank ``src``'s ``tensor`` copied into every rank's ``tensor`` (in place)."""
        self._peer(src, src, "broadcast")
        if self.world_size == 1:
            return tensor
        with self._measure("broadcast", tensor):
            return self.communicator.broadcast(tensor, src)

    def _peer(self, peer: int | None, default: int, op: str) -> int:
        """``peer`` (or ``default``), checked to be a rank of the group."""
        peer = default if peer is None else peer
        if not 0 <= peer < self.world_size:
            raise ValueError(
                f"{op}: rank {peer} is not in group {self.name!r} of {self.world_size} rank(s)"
            )
        return peer

    def _loopback_take(self, queue: deque, op: str) -> Any:
        if not queue:
            raise RuntimeError(
                f"{op} on group {self.name!r} of one rank: nothing was sent to this rank"
                " (a group of one receives only what it sent itself, in order)"
            )
        return queue.popleft()

    def send(self, tensor: torch.Tensor, dst: int | None = None) -> None:
        """Send to rank ``dst`` of the group (default: the next rank). A group of one keeps
        a copy for its own :meth:`recv`."""
        dst = self._peer(dst, self.next_rank, "send")
        if self.world_size == 1:
            self._loopback.append(tensor.detach().to(self.device, copy=True))
            return
        with self._measure("send", tensor):
            self.communicator.send(tensor, dst)

    def recv(
        self, shape: torch.Size | tuple[int, ...], dtype: torch.dtype, src: int | None = None
    ) -> torch.Tensor:
        """Receive a tensor of ``shape`` and ``dtype`` from rank ``src`` (default: previous).
        A group of one returns the oldest tensor it sent itself, which must match."""
        src = self._peer(src, self.prev_rank, "recv")
        if self.world_size == 1:
            sent = self._loopback_take(self._loopback, "recv")
            if sent.shape != torch.Size(shape) or sent.dtype != dtype:
                raise RuntimeError(
                    f"recv on group {self.name!r} of one rank: expected {tuple(shape)} {dtype},"
                    f" but this rank sent itself {tuple(sent.shape)} {sent.dtype}"
                )
            return sent
        tensor = torch.empty(shape, dtype=dtype, device=self.device)
        with self._measure("recv", tensor):
            return self.communicator.recv(tensor, src)

    # Objects and control ------------------------------------------------------------

    def broadcast_object(self, obj: Any = None, src: int = 0) -> Any:
        """Rank ``src``'s picklable ``obj`` on every rank."""
        self._peer(src, src, "broadcast_object")
        if self.world_size == 1:
            return obj
        box = [obj if self.rank_in_group == src else None]
        dist.broadcast_object_list(box, group=self.cpu_group, group_src=src)
        return box[0]

    def broadcast_tensor_dict(
        self, tensor_dict: dict[str, Any] | None = None, src: int = 0
    ) -> dict[str, Any]:
        """Rank ``src``'s dict on every rank: metadata over the cpu group, tensors over the
        device group (one broadcast each), other values pickled with the metadata."""
        self._peer(src, src, "broadcast_tensor_dict")
        if self.world_size == 1:
            return tensor_dict
        is_src = self.rank_in_group == src
        meta = None
        if is_src:
            meta = {
                k: ("tensor", v.shape, v.dtype) if isinstance(v, torch.Tensor) else ("value", v)
                for k, v in tensor_dict.items()
            }
        meta = self.broadcast_object(meta, src)
        out = {}
        for key, entry in meta.items():
            if entry[0] == "value":
                out[key] = entry[1]
                continue
            tensor = (
                tensor_dict[key].to(self.device).contiguous()
                if is_src
                else torch.empty(entry[1], dtype=entry[2], device=self.device)
            )
            out[key] = self.broadcast(tensor, src)
        return out

    def send_object(self, obj: Any, dst: int | None = None) -> None:
        """Send a picklable ``obj`` to rank ``dst`` of the group (default: the next rank)."""
        dst = self._peer(dst, self.next_rank, "send_object")
        if self.world_size == 1:
            self._loopback_objects.append(obj)
            return
        dist.send_object_list([obj], group=self.cpu_group, group_dst=dst)

    def recv_object(self, src: int | None = None) -> Any:
        """Receive an object from rank ``src`` of the group (default: the previous rank)."""
        src = self._peer(src, self.prev_rank, "recv_object")
        if self.world_size == 1:
            return self._loopback_take(self._loopback_objects, "recv_object")
        box = [None]
        dist.recv_object_list(box, group=self.cpu_group, group_src=src)
        return box[0]

    def barrier(self) -> None:
        """Wait until every rank of the group arrives."""
        if self.world_size > 1:
            dist.barrier(group=self.cpu_group)
