"""Gradient-norm clipping that knows which gradients are tp shards.

Every tp rank holds its shard of a sharded parameter's gradient but the whole gradient of
a replicated one, so the global norm sums the shards' squares over their tp group and
counts each replicated gradient once. Gradients of replicas over dp × sp are already
reduced (identical) when clipping runs, so nothing more is summed.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from vidpar.distributed.full_weights import shard_groups
from vidpar.distributed.group import GroupCoordinator


@torch.no_grad()
def clip_grad_norm_(
    model: nn.Module, parameters: Iterable[torch.Tensor], max_norm: float
) -> torch.Tensor:
    """Scale the gradients of ``parameters`` (of ``model``) in place so that their global
    2-norm is at most ``max_norm``; returns the norm before clipping (the same on every
    rank of a tp group)."""
    groups = shard_groups(model)
    pairs = [(p.grad, groups.get(id(p))) for p in parameters if p.grad is not None]
    if not pairs:
        return torch.zeros(())
    total = torch.zeros((), dtype=torch.float32, device=pairs[0][0].device)
    sharded: dict[int, tuple[GroupCoordinator, torch.Tensor]] = {}
    for grad, group in pairs:
        square = grad.detach().float().pow(2).sum()
        if group is None or group.world_size == 1:
            total += square
        else:
            sharded.setdefault(id(group), (group, torch.zeros_like(total)))[1].add_(square)
    for group, part in sharded.values():
        total += group.all_reduce(part)
    norm = total.sqrt()
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for grad, _ in pairs:
        grad.mul_(scale)
    return norm
