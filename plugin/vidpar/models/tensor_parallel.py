"""Turning a model's own layers into their tensor-parallel shards, in place.

Each function takes a layer of the single-device model and returns vidpar's tp layer
holding this rank's chunk of the same weights (``tensor_parallel_dim`` tagged, see
:mod:`vidpar.distributed.full_weights`); :func:`replace_module` puts it back under the same attribute
path, so parameter names stay those of the single-device model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vidpar.distributed.communication_op import (
    copy_to_group,
    gather_from_group,
    reduce_from_group,
)
from vidpar.distributed.full_weights import (
    shard_sizes,
    tensor_parallel_shard,
    tensor_parallel_sizes,
)
from vidpar.distributed.group import GroupCoordinator
from vidpar.nn.linear import ColumnParallelLinear, RowParallelLinear, TensorParallelModule

__all__ = [
    "HeadShardedRMSNorm",
    "column_parallel",
    "gather_shards",
    "layer_norm_shared",
    "replace_module",
    "replicated_over",
    "row_parallel",
    "shared_over",
]


def _plain_linear(linear: nn.Module, path: str) -> nn.Linear:
    if type(linear) is not nn.Linear:
        raise TypeError(
            f"{path} is a {type(linear).__name__}, not a plain torch.nn.Linear, so it cannot be "
            "split over tp; parallelize the model before wrapping its layers (PEFT LoRA, "
            "quantisation, ...)"
        )
    return linear


def _sharded_linear(
    cls: type[ColumnParallelLinear | RowParallelLinear],
    linear: nn.Module,
    path: str,
    group: GroupCoordinator,
    weight_dim: int,
    unit: int | None,
) -> ColumnParallelLinear | RowParallelLinear:
    linear = _plain_linear(linear, path)
    weight, bias = linear.weight, linear.bias
    layer = cls(
        linear.in_features,
        linear.out_features,
        bias=bias is not None,
        group=group,
        split_unit=unit,
        device="meta",
        dtype=weight.dtype,
    )
    layer.to_empty(device=weight.device)  # no full-size initialisation, tags kept
    with torch.no_grad():
        sizes = shard_sizes(layer.weight)
        layer.weight.copy_(tensor_parallel_shard(weight, weight_dim, group, sizes))
        if bias is not None:
            sharded = getattr(layer.bias, "tensor_parallel_dim", None) is not None
            layer.bias.copy_(tensor_parallel_shard(bias, 0, group, sizes) if sharded else bias)
    for mine, theirs in ((layer.weight, weight), (layer.bias, bias)):
        if mine is not None:
            mine.requires_grad_(theirs.requires_grad)
    layer.train(linear.training)
    return layer


def column_parallel(
    linear: nn.Module, group: GroupCoordinator, path: str, unit: int | None = None
) -> ColumnParallelLinear:
    """``linear`` with its output features (rows of the weight, and the bias) split over
    ``group``: each rank computes its slice of the output. With ``unit`` the features go in
    whole units of that many (a head's ``head_dim``), unevenly where ``group`` does not
    divide them (the first ranks one more)."""
    return _sharded_linear(ColumnParallelLinear, linear, path, group, 0, unit)


def row_parallel(
    linear: nn.Module, group: GroupCoordinator, path: str, unit: int | None = None
) -> RowParallelLinear:
    r"""``linear`` with its input features (columns of the weight) split over ``group``
    (in whole ``unit``\ s as :func:`column_parallel`); the partial products are summed over
    the group and the (replicated) bias added once."""
    return _sharded_linear(RowParallelLinear, linear, path, group, 1, unit)


def gather_shards(x: torch.Tensor, group: GroupCoordinator, sizes: tuple[int, ...]) -> torch.Tensor:
    """Every rank's features of ``x`` (its shard of ``sizes[rank]`` along the last dim)
    concatenated: one all-gather, uneven shards padded to the largest for it; backward
    keeps this rank's shard of the gradient."""
    if group.world_size == 1 or min(sizes) == max(sizes):
        return gather_from_group(x, group, -1)
    largest = max(sizes)
    padded = F.pad(x, (0, largest - x.shape[-1]))
    parts = gather_from_group(padded, group, -1).split(largest, -1)
    return torch.cat([part[..., :n] for part, n in zip(parts, sizes, strict=True)], -1)


def replace_module(root: nn.Module, path: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted attribute ``path`` of ``root`` (``"blocks.0.attn1.to_q"``)."""
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


class HeadShardedRMSNorm(TensorParallelModule):
    """RMSNorm over the whole feature dim ``heads × head_dim`` of a tensor whose features
    are split over tp by heads (the output of a :func:`column_parallel` projection), as
    Wan's ``norm_q``/``norm_k`` (``qk_norm="rms_norm_across_heads"``).

    The sum of squares is all-reduced over tp, forward and backward (every rank's heads
    depend on every rank's features), and the weight is split with the heads (``heads``
    of them: unevenly where tp does not divide them, as the projections' heads). Numerics
    follow ``torch.nn.RMSNorm``: computed in float32 or wider, cast back, then scaled.
    """

    def __init__(self, norm: nn.RMSNorm, group: GroupCoordinator, heads: int | None = None) -> None:
        super().__init__(group)
        if len(norm.normalized_shape) != 1:
            raise ValueError(f"expected an RMSNorm over one dim, got {norm.normalized_shape}")
        self.full_features = norm.normalized_shape[0]
        self.eps = norm.eps
        sizes = None
        if heads is not None and self.full_features % heads == 0:
            sizes = tensor_parallel_sizes(heads, self.tp_group, self.full_features // heads)
        weight = norm.weight
        if weight is None:
            self.register_sharded("weight", None, 0)
        else:
            shard = tensor_parallel_shard(weight.detach(), 0, self.tp_group, sizes).clone()
            self.register_sharded("weight", shard, 0, sizes)
            self.weight.requires_grad_(weight.requires_grad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = self.tp_group
        dtype = torch.promote_types(x.dtype, torch.float32)
        y = x.to(dtype)
        squares = y.pow(2).sum(-1, keepdim=True)
        squares = reduce_from_group(copy_to_group(squares, group), group)
        eps = torch.finfo(dtype).eps if self.eps is None else self.eps
        y = (y * torch.rsqrt(squares / self.full_features + eps)).type_as(x)
        return y if self.weight is None else y * self.weight

    def extra_repr(self) -> str:
        return f"{self.full_features}, eps={self.eps}, tp={self.tp_group.world_size}"


def replicated_over(param: torch.Tensor | None, group: GroupCoordinator) -> torch.Tensor | None:
    """``param`` as used by this rank's share of a computation split over ``group`` (a
    per-head norm weight shared by all heads while the heads are split over tp): the
    same value, with its gradient summed over the group."""
    return None if param is None else copy_to_group(param, group)


def shared_over(module: nn.Module, x: torch.Tensor, group: GroupCoordinator) -> torch.Tensor:
    """``module(x)`` for a module whose parameters every head shares (a per-head RMSNorm)
    while this rank holds only its tp share of the heads: the module's own numerics, its
    parameters' gradients summed over ``group``."""
    if group.world_size == 1:
        return module(x)
    params = {name: replicated_over(p, group) for name, p in module.named_parameters()}
    return torch.func.functional_call(module, params, (x,))


def layer_norm_shared(x: torch.Tensor, norm: nn.LayerNorm, group: GroupCoordinator) -> torch.Tensor:
    """``norm(x)`` for a LayerNorm whose weight and bias every head shares, while this
    rank holds only its tp share of the heads: the parameters' gradients are summed over
    ``group``."""
    weight = replicated_over(norm.weight, group)
    bias = replicated_over(norm.bias, group)
    return F.layer_norm(x, norm.normalized_shape, weight, bias, norm.eps)
