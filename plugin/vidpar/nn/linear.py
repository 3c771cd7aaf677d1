"""Tensor-parallel linear layers and full (single-device) checkpoints for them.

Contract shared with the rest of vidpar: a parameter sharded over the tp group carries
``tensor_parallel_dim: int``, meaning "this parameter is the tp-rank-th equal chunk of the
full single-device tensor along that dim". Parameters without it are replicated.
Parameter names are those of the single-device model, so a full state dict fits any tp
size: :func:`load_full_state_dict` slices it, :func:`full_state_dict` gathers it back.

Layers find their group when they are built: an explicit ``group``, else the layout's
(:func:`vidpar.distributed.get_tp_group`), else (no layout initialised, or inside
:func:`single_process`) a group of one rank that never communicates. Initialisation draws
the full single-device tensor and keeps this rank's chunk, so a model built under any
layout after ``torch.manual_seed(s)`` holds exactly the weights of the single-device
model built after the same seed.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
from collections.abc import Iterator, Mapping

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from vidpar.distributed import parallel_state as ps
from vidpar.distributed.communication_op import (
    copy_to_group,
    gather_from_group,
    reduce_from_group,
    shard_to_group,
)
from vidpar.distributed.parallel_state import GroupCoordinator

__all__ = [
    "ColumnParallelLinear",
    "GroupRef",
    "QKVParallelLinear",
    "RowParallelLinear",
    "TensorParallelModule",
    "full_state_dict",
    "load_full_state_dict",
    "load_full_weights",
    "mark_tensor_parallel",
    "resolve_group",
    "save_full_weights",
    "single_process",
    "tensor_parallel_shard",
]

# Groups --------------------------------------------------------------------------

_single_process_depth = 0
_SINGLE: dict[str, GroupCoordinator] = {}
_GETTERS = {
    "tp": ps.get_tp_group,
    "sp": ps.get_sp_group,
    "ulysses": ps.get_ulysses_group,
    "ring": ps.get_ring_group,
    "cfg": ps.get_cfg_group,
    "dp": ps.get_dp_group,
    "dp_sp": ps.get_dp_sp_group,
}


@contextlib.contextmanager
def single_process() -> Iterator[None]:
    """Layers built inside behave as if no layout were initialised: tp = sp = 1, no
    communication (a single-device reference model, an unsharded EMA copy, ...)."""
    global _single_process_depth
    _single_process_depth += 1
    try:
        yield
    finally:
        _single_process_depth -= 1


def _group_of_one(name: str) -> GroupCoordinator:
    rank = dist.get_rank() if dist.is_initialized() else 0
    key = f"{name}:{rank}"
    if key not in _SINGLE:
        _SINGLE[key] = GroupCoordinator(name, [rank], None, None, torch.device("cpu"))
    return _SINGLE[key]


def resolve_group(name: str, group: GroupCoordinator | None = None) -> GroupCoordinator:
    """``group`` if given; else the layout's group ``name`` (``"tp"``, ``"ulysses"``, ...);
    else, with no layout initialised or inside :func:`single_process`, a group of one."""
    if group is not None:
        return group
    if name not in _GETTERS:
        raise ValueError(f"unknown group {name!r}; known groups: {sorted(_GETTERS)}")
    if _single_process_depth or not ps.model_parallel_is_initialized():
        return _group_of_one(name)
    return _GETTERS[name]()


class GroupRef:
    """Holds a :class:`GroupCoordinator` for a module. Process groups cannot be copied, so
    copies of the module (``copy.deepcopy``, e.g. an EMA model) share the same group."""

    __slots__ = ("group",)

    def __init__(self, group: GroupCoordinator) -> None:
        self.group = group

    def __deepcopy__(self, memo: dict) -> GroupRef:
        return self


# Sharded parameters --------------------------------------------------------------


def mark_tensor_parallel(param: nn.Parameter, dim: int) -> nn.Parameter:
    """Tag ``param`` as the tp-rank-th equal chunk of the full tensor along ``dim``."""
    param.tensor_parallel_dim = dim
    return param


def tensor_parallel_shard(full: torch.Tensor, dim: int, group: GroupCoordinator) -> torch.Tensor:
    """This rank's equal chunk of ``full`` along ``dim`` (a view)."""
    n = group.world_size
    if full.shape[dim] % n:
        raise ValueError(f"dimension {dim} of size {full.shape[dim]} does not split into tp({n})")
    return full.chunk(n, dim)[group.rank_in_group]


def _divide(name: str, value: int, group: GroupCoordinator) -> int:
    if value % group.world_size:
        raise ValueError(
            f"{name}({value}) is not divisible by tp({group.world_size}); choose sizes that "
            f"tp divides or a smaller tp"
        )
    return value // group.world_size


class TensorParallelModule(nn.Module):
    """Base of modules with tp-sharded parameters.

    Holds the tp group (:attr:`tp_group`: ``group``, else resolved by
    :func:`resolve_group`), registers sharded parameters with
    :meth:`register_sharded`, initialises them chunk-wise (:meth:`init_sharded`), and
    keeps their ``tensor_parallel_dim`` tags through ``.to()``, ``.to_empty()`` and
    ``copy.deepcopy``, which may replace the Parameter objects.
    """

    def __init__(self, group: GroupCoordinator | None = None) -> None:
        super().__init__()
        self._tp = GroupRef(resolve_group("tp", group))
        self._tp_dims: dict[str, int] = {}

    @property
    def tp_group(self) -> GroupCoordinator:
        """The group this module's shards span."""
        return self._tp.group

    def register_sharded(self, name: str, tensor: torch.Tensor | None, dim: int) -> None:
        """Register ``tensor`` (this rank's chunk, or ``None``) as parameter ``name``, split
        over tp along ``dim``."""
        if tensor is None:
            self.register_parameter(name, None)
            return
        self.register_parameter(name, mark_tensor_parallel(nn.Parameter(tensor), dim))
        self._tp_dims[name] = dim

    def _retag(self) -> None:
        for name, dim in self.__dict__.get("_tp_dims", {}).items():
            param = self._parameters.get(name)
            if param is not None:
                param.tensor_parallel_dim = dim

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
        param.copy_(full if dim is None else tensor_parallel_shard(full, dim, self.tp_group))


class ColumnParallelLinear(TensorParallelModule):
    """``y = x Wᵀ + b`` with W's output rows split over tp: each rank computes its slice
    of the features. ``gather_output`` concatenates the slices (every rank gets all of
    ``y``); otherwise the output stays split, ready for a :class:`RowParallelLinear`."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        gather_output: bool = False,
        group: GroupCoordinator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(group)
        group = self.tp_group
        self.in_features, self.out_features = in_features, out_features
        self.gather_output = gather_output
        local = _divide("out_features", out_features, group)
        kw = {"device": device, "dtype": dtype}
        self.register_sharded("weight", torch.empty(local, in_features, **kw), 0)
        self.register_sharded("bias", torch.empty(local, **kw) if bias else None, 0)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.Linear``'s distribution, U(±1/sqrt(in_features)), drawn for the full
        tensor."""
        bound = 1 / math.sqrt(self.in_features)
        self.init_sharded(self.weight, (self.out_features, self.in_features), bound)
        self.init_sharded(self.bias, (self.out_features,), bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = self.tp_group
        y = F.linear(copy_to_group(x, group), self.weight, self.bias)
        return gather_from_group(y, group, -1) if self.gather_output else y

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"tp={self.tp_group.world_size}, gather_output={self.gather_output}"
        )


class RowParallelLinear(TensorParallelModule):
    """``y = x Wᵀ + b`` with W's input columns split over tp: each rank multiplies its
    slice of the features and the partial products are summed over tp. With
    ``input_is_parallel`` (the default) ``x`` is already this rank's feature slice (the
    output of a :class:`ColumnParallelLinear`); otherwise the layer takes it. The bias is
    replicated and added once, after the sum."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        input_is_parallel: bool = True,
        group: GroupCoordinator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(group)
        group = self.tp_group
        self.in_features, self.out_features = in_features, out_features
        self.input_is_parallel = input_is_parallel
        local = _divide("in_features", in_features, group)
        kw = {"device": device, "dtype": dtype}
        self.register_sharded("weight", torch.empty(out_features, local, **kw), 1)
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.Linear``'s distribution, U(±1/sqrt(in_features)), drawn for the full
        tensor."""
        bound = 1 / math.sqrt(self.in_features)
        self.init_sharded(self.weight, (self.out_features, self.in_features), bound)
        self.init_sharded(self.bias, (self.out_features,), bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = self.tp_group
        if not self.input_is_parallel:
            x = shard_to_group(x, group, -1)
        # The matmul output is fresh and not saved for backward: reduce it without a copy.
        y = reduce_from_group(F.linear(x, self.weight), group, in_place=True)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"tp={self.tp_group.world_size}, input_is_parallel={self.input_is_parallel}"
        )


class QKVParallelLinear(TensorParallelModule):
    """Fused query/key/value projection, column-parallel by heads.

    ``weight`` is ``[3, heads_local × head_dim, in]`` (full: ``[3, heads × head_dim, in]``,
    sharded along dim 1) and ``bias`` ``[3, heads_local × head_dim]``, so each tp rank owns
    whole heads of q, k and v. :meth:`forward` returns ``(q, k, v)``, each
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
        self.num_heads_per_rank = _divide("num_heads", num_heads, group)
        local = self.num_heads_per_rank * head_dim
        kw = {"device": device, "dtype": dtype}
        self.register_sharded("weight", torch.empty(3, local, hidden_size, **kw), 1)
        self.register_sharded("bias", torch.empty(3, local, **kw) if bias else None, 1)
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


# Full checkpoints ----------------------------------------------------------------


def _shard_groups(model: nn.Module, group: GroupCoordinator | None) -> dict[int, GroupCoordinator]:
    """The tp group of every sharded parameter (or buffer): its owning module's
    ``tp_group`` if that module has one, else ``group`` (default: the layout's tp group)."""
    default = resolve_group("tp", group)
    groups: dict[int, GroupCoordinator] = {}
    for module in model.modules():
        owner = getattr(module, "_tp", None)
        owner = owner.group if isinstance(owner, GroupRef) else default
        for tensor in itertools.chain(module.parameters(False), module.buffers(False)):
            if getattr(tensor, "tensor_parallel_dim", None) is not None:
                groups[id(tensor)] = owner
    return groups


def load_full_state_dict(
    model: nn.Module,
    full_state_dict: Mapping[str, torch.Tensor],
    *,
    strict: bool = True,
    group: GroupCoordinator | None = None,
) -> tuple[list[str], list[str]]:
    """Copy a single-device state dict into ``model``: each rank takes its chunk of every
    tp-sharded parameter (``tensor_parallel_dim``) and all of every other entry.

    No communication. Returns ``(missing, unexpected)`` keys; with ``strict`` either
    raises ``KeyError``. ``group`` is the tp group for sharded parameters whose module
    does not name one (default: the layout's).
    """
    own = model.state_dict(keep_vars=True)
    missing = [k for k in own if k not in full_state_dict]
    unexpected = [k for k in full_state_dict if k not in own]
    if strict and (missing or unexpected):
        raise KeyError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    groups = _shard_groups(model, group)
    with torch.no_grad():
        for name, target in own.items():
            if name not in full_state_dict:
                continue
            source = full_state_dict[name]
            dim = getattr(target, "tensor_parallel_dim", None)
            if dim is not None:
                tp = groups[id(target)]
                expected = list(target.shape)
                expected[dim] *= tp.world_size
                if list(source.shape) != expected:
                    raise ValueError(
                        f"{name}: full shape {tuple(source.shape)} is not tp({tp.world_size}) "
                        f"shards of {tuple(target.shape)} along dim {dim}"
                    )
                source = tensor_parallel_shard(source, dim, tp)
            elif source.shape != target.shape:
                raise ValueError(
                    f"{name}: shape {tuple(source.shape)} does not match {tuple(target.shape)}"
                )
            target.copy_(source)
    return missing, unexpected


def full_state_dict(
    model: nn.Module, *, group: GroupCoordinator | None = None
) -> dict[str, torch.Tensor]:
    """The single-device state dict of ``model``: tp-sharded entries are all-gathered over
    their tp group, the rest copied. Every rank of the tp group must call it."""
    groups = _shard_groups(model, group)
    out = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        dim = getattr(tensor, "tensor_parallel_dim", None)
        if dim is None:
            out[name] = tensor.detach().clone()
        else:
            tp = groups[id(tensor)]
            gathered = tp.all_gather(tensor.detach().contiguous(), dim)
            out[name] = gathered.clone() if tp.world_size == 1 else gathered
    return out


def load_full_weights(
    model: nn.Module,
    source: str | os.PathLike | Mapping[str, torch.Tensor],
    *,
    strict: bool = True,
    group: GroupCoordinator | None = None,
) -> tuple[list[str], list[str]]:
    """:func:`load_full_state_dict` from a state dict or a ``.safetensors`` file path."""
    if isinstance(source, str | os.PathLike):
        from safetensors.torch import load_file

        source = load_file(os.fspath(source))
    return load_full_state_dict(model, source, strict=strict, group=group)


def save_full_weights(
    model: nn.Module, path: str | os.PathLike, *, group: GroupCoordinator | None = None
) -> dict[str, torch.Tensor]:
    """Gather :func:`full_state_dict` (every rank of the tp group calls this) and write it
    as one ``.safetensors`` file from global rank 0. Returns the full state dict."""
    from safetensors.torch import save_file

    state = full_state_dict(model, group=group)
    if not dist.is_initialized() or dist.get_rank() == 0:
        save_file({k: v.cpu().contiguous() for k, v in state.items()}, os.fspath(path))
    return state
