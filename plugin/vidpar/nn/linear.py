"""Tensor-parallel linear layers.

Every sharded parameter follows vidpar's tp contract (:mod:`vidpar.distributed.full_weights`):
it carries ``tensor_parallel_dim`` and keeps its single-device name, so full checkpoints
load into any tp size and gather back. Layers split in whole units (``split_unit``: the
heads of a projection; QKV always) need no tp that divides them: the first ranks hold one
unit more (``tensor_parallel_sizes``).

Layers find their group when they are built: an explicit ``group``, else the current
layout's (:func:`vidpar.distributed.get_parallel_state`; a world of one without a layout
or inside :func:`vidpar.distributed.single_process`). Initialisation draws the full
single-device tensor and keeps this rank's chunk, so a model built under any layout after
``torch.manual_seed(s)`` holds exactly the weights of the single-device model built after
the same seed.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vidpar.distributed.communication_op import (
    copy_to_group,
    gather_from_group,
    reduce_from_group,
    shard_to_group,
)
from vidpar.distributed.full_weights import (
    mark_tensor_parallel,
    shard_sizes,
    tensor_parallel_shard,
    tensor_parallel_sizes,
)
from vidpar.distributed.group import GroupCoordinator
from vidpar.distributed.state import get_parallel_state

__all__ = [
    "ColumnParallelLinear",
    "GroupRef",
    "QKVParallelLinear",
    "RowParallelLinear",
    "TensorParallelModule",
]


class GroupRef:
    """Holds a :class:`GroupCoordinator` for a module. Process groups cannot be copied, so
    copies of the module (``copy.deepcopy``, e.g. an EMA model) share the same group."""

    __slots__ = ("group",)

    def __init__(self, group: GroupCoordinator) -> None:
        self.group = group

    def __deepcopy__(self, memo: dict) -> GroupRef:
        return self


def _divide(name: str, value: int, group: GroupCoordinator) -> int:
    if value % group.world_size:
        raise ValueError(
            f"{name}({value}) is not divisible by tp({group.world_size}); choose sizes that "
            f"tp divides or a smaller tp"
        )
    return value // group.world_size


def _unit_shards(
    what: str, units: int, unit: int, group: GroupCoordinator, noun: str = "whole units"
) -> tuple[int, tuple[int, ...] | None]:
    """This rank's features of ``units`` whole units of ``unit`` features (heads) split
    over tp, the first ranks one unit more, and every rank's (``None`` when equal)."""
    if units < group.world_size:
        raise ValueError(
            f"{what} has {units} {noun}, fewer than tp({group.world_size}): "
            f"every tp rank needs one; choose tp ≤ {units}"
        )
    sizes = tensor_parallel_sizes(units, group, unit)
    local = units // group.world_size * unit if sizes is None else sizes[group.rank_in_group]
    return local, sizes


class TensorParallelModule(nn.Module):
    """Base of modules with tp-sharded parameters.

    Holds the tp group (:attr:`tp_group`: ``group``, else the current layout's), registers sharded parameters with
    :meth:`register_sharded`, initialises them chunk-wise (:meth:`init_sharded`), and
    keeps their ``tensor_parallel_dim`` tags through ``.to()``, ``.to_empty()`` and
    ``copy.deepcopy``, which may replace the Parameter objects.
    """

    def __init__(self, group: GroupCoordinator | None = None) -> None:
        super().__init__()
        self._tp = GroupRef(group or get_parallel_state().group("tp"))
        self._tp_dims: dict[str, int] = {}
        self._tp_sizes: dict[str, tuple[int, ...]] = {}

    @property
    def tp_group(self) -> GroupCoordinator:
        """The group this module's shards span."""
        return self._tp.group

    def register_sharded(
        self,
        name: str,
        tensor: torch.Tensor | None,
        dim: int,
        sizes: tuple[int, ...] | None = None,
    ) -> None:
        """Register ``tensor`` (this rank's chunk, or ``None``) as parameter ``name``, split
        over tp along ``dim`` (unevenly: every rank's ``sizes``)."""
        if tensor is None:
            self.register_parameter(name, None)
            return
        self.register_parameter(name, mark_tensor_parallel(nn.Parameter(tensor), dim, sizes))
        self._tp_dims[name] = dim
        if sizes is not None:
            self._tp_sizes[name] = sizes

    def _retag(self) -> None:
        sizes = self.__dict__.get("_tp_sizes", {})
        for name, dim in self.__dict__.get("_tp_dims", {}).items():
            param = self._parameters.get(name)
            if param is not None:
                mark_tensor_parallel(param, dim, sizes.get(name))

    def _apply(self, fn, recurse: bool = True):
        result = super()._apply(fn, recurse)
        self._retag()
        return result

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._retag()

    @torch.no_grad()
    def init_sharded(self, param: nn.Parameter | None, full_shape: tuple[int, ...], bound: float):
        """Draw the full tensor U(-bound, bound) (the RNG advances as on one device) and
        keep this rank's chunk; replicated parameters keep all of it."""
        if param is None or param.device.type == "meta":
            return
        full = torch.empty(full_shape, dtype=param.dtype, device=param.device)
        full.uniform_(-bound, bound)
        dim = getattr(param, "tensor_parallel_dim", None)
        if dim is not None:
            full = tensor_parallel_shard(full, dim, self.tp_group, shard_sizes(param))
        param.copy_(full)


class _ParallelLinear(TensorParallelModule):
    """``y = x Wᵀ + b`` with W split over tp along :attr:`split_dim` (0: output rows, 1:
    input columns); the bias is split with the output rows or else replicated. With
    ``split_unit`` the split side goes in whole units of that many features (an attention
    head's ``head_dim``; 1 for FFN channels), unevenly when tp does not divide them;
    without it tp must divide that side."""

    split_dim: int

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        group: GroupCoordinator | None = None,
        split_unit: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(group)
        self.in_features, self.out_features = in_features, out_features
        split = self.split_dim
        shape = [out_features, in_features]
        name = ("out_features", "in_features")[split]
        unit = split_unit
        if unit is None:
            shape[split], sizes = _divide(name, shape[split], self.tp_group), None
        elif shape[split] % unit:
            raise ValueError(f"{name}({shape[split]}) is not whole units of split_unit({unit})")
        else:
            what = f"{name}({shape[split]})"
            shape[split], sizes = _unit_shards(what, shape[split] // unit, unit, self.tp_group)
        self.is_uneven = sizes is not None
        kw = {"device": device, "dtype": dtype}
        self.register_sharded("weight", torch.empty(shape, **kw), split, sizes)
        if not bias:
            self.register_parameter("bias", None)
        elif split == 0:
            self.register_sharded("bias", torch.empty(shape[0], **kw), 0, sizes)
        else:
            self.bias = nn.Parameter(torch.empty(out_features, **kw))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.Linear``'s distribution, U(±1/sqrt(in_features)), drawn for the full
        tensor."""
        bound = 1 / math.sqrt(self.in_features)
        self.init_sharded(self.weight, (self.out_features, self.in_features), bound)
        self.init_sharded(self.bias, (self.out_features,), bound)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"tp={self.tp_group.world_size}"
        )

    def _need_even(self, option: str, features: str, advice: str) -> None:
        """Refuse ``option``, which needs equal shards, on an uneven split of ``features``."""
        if self.is_uneven:
            raise ValueError(
                f"{option} needs equal shards: {features}({getattr(self, features)}) split "
                f"unevenly over tp({self.tp_group.world_size}); {advice}"
            )


class ColumnParallelLinear(_ParallelLinear):
    """``y = x Wᵀ + b`` with W's output rows split over tp: each rank computes its slice
    of the features. ``gather_output`` concatenates the slices (every rank gets all of
    ``y``); otherwise the output stays split, ready for a :class:`RowParallelLinear`.
    Other arguments as :class:`torch.nn.Linear`, plus ``group`` (default: the layout's)
    and ``split_unit`` (split in whole units, see above; uneven shards cannot
    ``gather_output``)."""

    split_dim = 0

    def __init__(self, *args: Any, gather_output: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if gather_output:
            self._need_even("gather_output", "out_features", "keep the output split")
        self.gather_output = gather_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = self.tp_group
        y = F.linear(copy_to_group(x, group), self.weight, self.bias)
        return gather_from_group(y, group, -1) if self.gather_output else y


class RowParallelLinear(_ParallelLinear):
    """``y = x Wᵀ + b`` with W's input columns split over tp: each rank multiplies its
    slice of the features and the partial products are summed over tp. With
    ``input_is_parallel`` (the default) ``x`` is already this rank's feature slice (the
    output of a :class:`ColumnParallelLinear`); otherwise the layer takes it. The bias is
    replicated and added once, after the sum (inside the matmul when tp is 1: nothing to
    sum). Other arguments as :class:`ColumnParallelLinear`."""

    split_dim = 1

    def __init__(self, *args: Any, input_is_parallel: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not input_is_parallel:
            self._need_even("input_is_parallel=False", "in_features", "pass the split input")
        self.input_is_parallel = input_is_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = self.tp_group
        if group.world_size == 1:
            return F.linear(x, self.weight, self.bias)
        if not self.input_is_parallel:
            x = shard_to_group(x, group, -1)
        # The matmul output is fresh and not saved for backward: reduce it without a copy.
        y = reduce_from_group(F.linear(x, self.weight), group, in_place=True)
        return y if self.bias is None else y + self.bias


class QKVParallelLinear(TensorParallelModule):
    """Fused query/key/value projection, column-parallel by heads.

    ``weight`` is ``[3, heads_local × head_dim, in]`` (full: ``[3, heads × head_dim, in]``,
    sharded along dim 1) and ``bias`` ``[3, heads_local × head_dim]``, so each tp rank owns
    whole heads of q, k and v (when tp does not divide the heads, the first ranks one more). :meth:`forward` returns ``(q, k, v)``, each
    ``[..., heads_local, head_dim]``; the weight enters ``F.linear`` as a view (no copy).
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        head_dim: int | None = None,
        bias: bool = True,
        *,
        group: GroupCoordinator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(group)
        group = self.tp_group
        if head_dim is None:
            if hidden_size % num_heads:
                raise ValueError(
                    f"hidden_size({hidden_size}) is not divisible by num_heads({num_heads}); "
                    "pass head_dim"
                )
            head_dim = hidden_size // num_heads
        self.in_features, self.num_heads, self.head_dim = hidden_size, num_heads, head_dim
        local, sizes = _unit_shards(f"num_heads({num_heads})", num_heads, head_dim, group, "heads")
        self.num_heads_per_rank = local // head_dim
        kw = {"device": device, "dtype": dtype}
        self.register_sharded("weight", torch.empty(3, local, hidden_size, **kw), 1, sizes)
        self.register_sharded("bias", torch.empty(3, local, **kw) if bias else None, 1, sizes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """U(±1/sqrt(hidden_size)) for the full tensors, as three ``nn.Linear`` would."""
        bound = 1 / math.sqrt(self.in_features)
        full = self.num_heads * self.head_dim
        self.init_sharded(self.weight, (3, full, self.in_features), bound)
        self.init_sharded(self.bias, (3, full), bound)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        weight = self.weight.view(-1, self.in_features)
        bias = None if self.bias is None else self.bias.view(-1)
        qkv = F.linear(copy_to_group(x, self.tp_group), weight, bias)
        q, k, v = qkv.unflatten(-1, (3, self.num_heads_per_rank, self.head_dim)).unbind(-3)
        return q, k, v

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.in_features}, num_heads={self.num_heads}, "
            f"head_dim={self.head_dim}, tp={self.tp_group.world_size}"
        )
