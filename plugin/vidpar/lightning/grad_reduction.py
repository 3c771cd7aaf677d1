"""Gradients reduced over the replicas of one tp shard (the ``dp_sp`` group): summed over
sp, averaged over dp, by torch's DDP with a comm hook or by FSDP2.

Every sp rank holds the gradient of its own tokens, so the sp part of a replica group is
a sum; the dp part is a mean over different samples. DDP's default (and FSDP2's) would
divide by the whole group instead.
"""

from __future__ import annotations

import time
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from vidpar.distributed import telemetry
from vidpar.distributed.group import GroupCoordinator
from vidpar.distributed.state import ParallelState
from vidpar.distributed.telemetry import CollectiveRecord


def reduce_over_replicas(
    model: torch.nn.Module,
    state: ParallelState,
    data_parallel: Literal["ddp", "fsdp"],
    device_ids: list[int] | None = None,
    **ddp_kwargs: Any,
) -> torch.nn.Module:
    """``model`` made to reduce its gradients over ``state``'s dp × sp replicas: FSDP2
    units (``"fsdp"``, the same module) or a ``DistributedDataParallel`` wrapper with
    :func:`sum_over_sp_mean_over_dp` (``"ddp"``); unchanged when there is one replica
    (pure tensor parallelism)."""
    replicas, dp_size = state.group("dp_sp"), state.parallel.dp
    if replicas.world_size == 1:
        return model
    if data_parallel == "fsdp":
        return fully_shard_replicas(model, replicas, dp_size)
    wrapped = DistributedDataParallel(
        module=model, device_ids=device_ids, process_group=replicas.device_group, **ddp_kwargs
    )
    wrapped.register_comm_hook((replicas.device_group, dp_size), sum_over_sp_mean_over_dp)
    return wrapped


def sum_over_sp_mean_over_dp(state: tuple[dist.ProcessGroup, int], bucket):
    """DDP comm hook: a bucket all-reduced over the replica group and divided by dp alone.
    Each bucket is recorded as a ``dp_sp`` all-reduce when telemetry is on (host-timed,
    from issue to completion).

    No return annotation: DDP compares it to a type object, and this module's annotations
    are strings.
    """
    group, dp_size = state
    buffer = bucket.buffer()
    if dp_size > 1:
        buffer.div_(dp_size)
    recorder = telemetry.active_recorder()
    start = time.perf_counter()
    future = dist.all_reduce(buffer, group=group, async_op=True).get_future()

    def finish(fut: torch.futures.Future) -> torch.Tensor:
        if recorder is not None:
            recorder.add(
                CollectiveRecord(
                    "all_reduce",
                    "dp_sp",
                    str(buffer.dtype).removeprefix("torch."),
                    buffer.numel() * buffer.element_size(),
                    dist.get_world_size(group),
                    time.perf_counter() - start,
                )
            )
        return fut.value()[0]

    return future.then(finish)


def fully_shard_replicas(
    module: torch.nn.Module, replicas: GroupCoordinator, dp_size: int
) -> torch.nn.Module:
    """FSDP2 over the dp × sp replicas: shard each repeated block (the classes a model
    names in ``_no_split_modules``, as diffusers models do), each top-level child, then
    the root, so one block's weights are gathered at a time.

    Frozen children (an EMA copy, a frozen encoder) are units of their own too, so their
    weights are gathered when they run, not kept gathered with the root's."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    mesh = DeviceMesh.from_group(replicas.device_group, replicas.device.type)
    blocks = {n for m in module.modules() for n in (getattr(m, "_no_split_modules", None) or ())}
    for block in module.modules():
        if type(block).__name__ in blocks and any(True for _ in block.parameters()):
            fully_shard(block, mesh=mesh)
    for child in module.children():
        if any(True for _ in child.parameters()):
            fully_shard(child, mesh=mesh)
    fully_shard(module, mesh=mesh)
    # Sum over sp, mean over dp: every FSDP unit divides by dp, not the whole replica group.
    for unit in module.modules():
        if isinstance(unit, FSDPModule):
            unit.set_gradient_divide_factor(float(dp_size))
    return module
