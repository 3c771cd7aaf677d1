"""Trainable LoRA layers on a frozen base, for plain and tensor-parallel linears alike.

:func:`add_lora` puts a :class:`LoraLinear` in place of every targeted linear: the base
keeps its weight and bias under their own names (``blocks.0.attn1.to_q.weight``, frozen)
and gains ``lora_A.weight`` ``[r, in]`` and ``lora_B.weight`` ``[out, r]``, the names and
shapes of diffusers' PEFT layout. ``y = base(x) + (alpha / r) · B A dropout(x)``.

Under tp the factors follow the base's split (vidpar's tp contract, ``tensor_parallel_dim``),
so checkpoints reshard and every layout computes the single-device result:

* column-parallel base (output rows split): A replicated, B split by rows. A's gradient is
  partial on each rank (each sees its rows of the output) and is summed over tp;
* row-parallel base (input columns split): A split by columns, B replicated. The low-rank
  product is added to the partial output *before* the base's all-reduce (linear, so the sum
  is exact and costs no extra collective); B's gradient is summed over tp;
* a replicated linear: both factors replicated.

Factors are drawn as PEFT draws them (A ~ U(±1/√in), B = 0), from a generator seeded by
``seed`` and the layer's name, full-size, then sliced: every layout starts from the same
adapter. They are kept in the base weight's dtype (as PEFT keeps them in bf16 training
without autocast; under autocast every matmul runs in the autocast dtype as a plain
linear's does, the fp32 factors being the optimizer's master copy).

The base and the adapter run as one autograd function (:class:`_LoraLinearFunction`): the
update is added into the base's output by one ``addmm_`` (scale included), and backward
adds the adapter's input gradient into the base's by another, so a LoRA linear allocates
and saves what a plain linear does (its input, plus ``x Aᵀ`` of ``r`` columns) and skips
the frozen weight's gradient. A FeedForward's output layer applies the FFN's GELU itself
and saves only GELU's input (not GELU's output as well): at Wan2.1-1.3B's 32,760 tokens,
560 MiB less per block.
"""

from __future__ import annotations

import fnmatch
import math
import re
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
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
from vidpar.distributed.full_weights import shard_sizes, tensor_parallel_shard
from vidpar.nn.linear import ColumnParallelLinear, RowParallelLinear, TensorParallelModule

__all__ = [
    "WAN_TARGETS",
    "LoraLinear",
    "LoraSettings",
    "add_lora",
    "check_lora",
    "lora_parameters",
    "match_targets",
]

#: Wan's attention q/k/v/o projections (self- and cross-attention) and its FFN linears.
WAN_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2")
_LINEARS = (nn.Linear, ColumnParallelLinear, RowParallelLinear)


@dataclass(frozen=True)
class LoraSettings:
    """What to train: ``rank`` r, ``alpha`` (the update is scaled by ``alpha / r``;
    ``None``: alpha = r), ``targets`` (module-name patterns: a name, a dotted suffix of
    names such as ``to_q`` or ``ffn.net.2``, or a glob such as ``blocks.*.attn1.to_q``) and
    ``dropout`` on the adapters' input."""

    rank: int
    alpha: float | None = None
    targets: tuple[str, ...] = field(default=WAN_TARGETS)
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.targets, str) or not isinstance(self.targets, Iterable):
            raise ValueError(f"lora.targets must be a list of name patterns, got {self.targets!r}")
        object.__setattr__(self, "targets", tuple(self.targets))
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"lora.rank must be a positive integer, got {self.rank!r}")
        if self.alpha is not None and not (isinstance(self.alpha, int | float) and self.alpha > 0):
            raise ValueError(f"lora.alpha must be a positive number or null, got {self.alpha!r}")
        if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
            raise ValueError(f"lora.targets must be non-empty name patterns, got {self.targets!r}")
        if not (isinstance(self.dropout, int | float) and 0 <= self.dropout < 1):
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout!r}")

    @property
    def scaling(self) -> float:
        """``alpha / r``, PEFT's factor on ``B A``."""
        return (self.rank if self.alpha is None else self.alpha) / self.rank

    @classmethod
    def of(cls, value: LoraSettings | Mapping[str, Any] | None) -> LoraSettings | None:
        """Settings from themselves, a mapping (a Hydra node) or ``None`` (no LoRA)."""
        if value is None or isinstance(value, LoraSettings):
            return value
        if not isinstance(value, Mapping):
            raise TypeError(f"lora must be a mapping of settings or null, got {value!r}")
        unknown = set(value) - {"rank", "alpha", "targets", "dropout"}
        if unknown:
            raise ValueError(
                f"unknown lora settings {sorted(unknown)}: lora takes rank, alpha, targets, dropout"
            )
        return cls(**dict(value))

    def as_dict(self) -> dict[str, Any]:
        """Plain values (for hyper-parameters and JSON)."""
        return {**asdict(self), "targets": list(self.targets)}


class _Factor(TensorParallelModule):
    """One low-rank factor, ``weight``, split over tp along ``dim`` (``None``: replicated),
    in shards of ``sizes`` where its layer's are uneven (whole heads)."""

    def __init__(
        self, full: torch.Tensor, dim: int | None, group, sizes: tuple[int, ...] | None
    ) -> None:
        super().__init__(group)
        if dim is None:
            self.weight = nn.Parameter(full)
        else:
            shard = tensor_parallel_shard(full, dim, group, sizes).clone()
            self.register_sharded("weight", shard, dim, sizes)


class _LoraLinearFunction(torch.autograd.Function):
    """``y = x Wᵀ + bias + s · (d Aᵀ) Bᵀ`` with ``d`` the adapters' input (``x``, or its
    dropout when given as ``dropped``), as one autograd node.

    Forward adds the update into the base's output in place (``addmm_``, ``s`` as its
    alpha); backward builds ``∂x = g W + s (g B) A`` in one buffer and computes ``∂W`` only
    when the base is trainable. Saved: ``d`` (also ``x`` when the base is trainable and
    ``d`` is a dropout of it) and ``d Aᵀ`` ``[tokens, r]``; the weights by reference.

    With ``gelu`` (``"tanh"`` or ``"none"``, no ``dropped``) the input is ``GELU(h)`` of the
    given ``h``: ``h`` is saved instead of ``x`` and ``x`` is recomputed in backward, by the
    ops autograd would run (``gelu``, ``gelu_backward``), so values and gradients are those
    of a separate GELU while one tensor of the input's size is saved, not two."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling, dropped, gelu=None):
        h2 = x.reshape(-1, x.shape[-1])
        x2 = h2 if gelu is None else F.gelu(h2, approximate=gelu)
        d2 = x2 if dropped is None else dropped.reshape(-1, x.shape[-1])
        low = torch.mm(d2, lora_a.t())  # [tokens, r]
        y = x2.new_empty(*x.shape[:-1], weight.shape[0])  # not a view: callers may add in place
        y2 = y.view(-1, weight.shape[0])
        if bias is None:
            torch.mm(x2, weight.t(), out=y2)
        else:
            torch.addmm(bias, x2, weight.t(), out=y2)
        y2.addmm_(low, lora_b.t(), alpha=scaling)
        ctx.scaling, ctx.has_dropout, ctx.x_shape = scaling, dropped is not None, x.shape
        ctx.gelu = gelu
        keep_x = ctx.needs_input_grad[1] and dropped is not None
        saved = h2 if gelu is not None else d2
        ctx.save_for_backward(saved, low, weight, lora_a, lora_b, x2 if keep_x else None)
        return y

    @staticmethod
    def backward(ctx, grad):
        d2, low, weight, lora_a, lora_b, x2 = ctx.saved_tensors
        need_x, need_w, need_bias, need_a, need_b, _, need_d, _ = ctx.needs_input_grad
        h2 = None
        if ctx.gelu is not None:  # d2 holds GELU's input: the adapters' input recomputed
            h2, d2 = d2, F.gelu(d2, approximate=ctx.gelu)
        g = grad.reshape(-1, grad.shape[-1])
        g_low = torch.mm(g, lora_b).mul_(ctx.scaling)  # s · g B: [tokens, r]
        grad_x = grad_w = grad_bias = grad_a = grad_b = grad_d = None
        # The products with the input first: a recomputed GELU output is freed before ∂x.
        if need_w:
            grad_w = torch.mm(g.t(), d2 if x2 is None else x2)
        if need_a:
            grad_a = torch.mm(g_low.t(), d2)
        del d2, x2
        if need_x:
            grad_x = torch.mm(g, weight)
            if not ctx.has_dropout:
                grad_x.addmm_(g_low, lora_a)
            if h2 is not None:  # GELU's backward, written over its incoming gradient
                torch.ops.aten.gelu_backward.grad_input(
                    grad_x, h2, approximate=ctx.gelu, grad_input=grad_x
                )
            grad_x = grad_x.view(ctx.x_shape)
        if need_d and ctx.has_dropout:
            grad_d = torch.mm(g_low, lora_a).view(ctx.x_shape)
        if need_bias:
            grad_bias = g.sum(0)
        if need_b:
            grad_b = torch.mm(g.t(), low).mul_(ctx.scaling)
        return grad_x, grad_w, grad_bias, grad_a, grad_b, None, grad_d, None


class LoraLinear(TensorParallelModule):
    """A frozen linear (``nn.Linear``, :class:`ColumnParallelLinear` or
    :class:`RowParallelLinear`) plus trainable factors ``lora_A``/``lora_B`` split to match
    it (see the module doc). Keeps the base's parameters under ``weight``/``bias``.

    ``input_gelu`` (``None``, ``"tanh"`` or ``"none"``): the layer applies that GELU to its
    input itself, saving GELU's input for backward rather than GELU's output too (set by
    :func:`add_lora` where a diffusers ``FeedForward`` feeds its GELU to this layer)."""

    input_gelu: str | None = None

    def __init__(
        self,
        base: nn.Module,
        rank: int,
        scaling: float,
        dropout: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> None:
        if not isinstance(base, _LINEARS):
            raise TypeError(f"LoRA adapts linear layers, not {type(base).__name__}")
        parallel = isinstance(base, TensorParallelModule)
        super().__init__(base.tp_group if parallel else None)
        group = self.tp_group
        self.kind = (
            "column"
            if isinstance(base, ColumnParallelLinear)
            else "row"
            if isinstance(base, RowParallelLinear)
            else "replicated"
        )
        self.in_features, self.out_features = base.in_features, base.out_features
        self.gather_output = getattr(base, "gather_output", False)
        self.input_is_parallel = getattr(base, "input_is_parallel", True)
        self.rank, self.scaling, self.dropout = rank, scaling, dropout
        for name in ("weight", "bias"):
            param = getattr(base, name)
            self.register_parameter(name, param)
            if getattr(param, "tensor_parallel_dim", None) is not None:
                self._tp_dims[name] = param.tensor_parallel_dim
                if shard_sizes(param) is not None:
                    self._tp_sizes[name] = shard_sizes(param)
        weight = base.weight
        # Drawn on the CPU from the seeded CPU generator (whatever the ambient default device).
        a = torch.empty(rank, self.in_features, dtype=torch.float32, device="cpu")
        bound = 1 / math.sqrt(self.in_features)
        a.uniform_(-bound, bound, generator=generator)
        a = a.to(weight.device, weight.dtype)
        b = torch.zeros(self.out_features, rank, device=weight.device, dtype=weight.dtype)
        # The factor on the base's split side takes the base's shard sizes (uneven heads).
        sizes = shard_sizes(weight)
        split = {"column": (None, 0), "row": (1, None), "replicated": (None, None)}[self.kind]
        self.lora_A = _Factor(a, split[0], group, sizes)
        self.lora_B = _Factor(b, split[1], group, sizes)

    def _linear(
        self, x: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor
    ) -> torch.Tensor:
        """``x Wᵀ + bias + scaling · dropout(x) Aᵀ Bᵀ`` (``x`` through :attr:`input_gelu`
        first when set) in the autocast dtype if autocast is on (as ``F.linear`` would),
        else in the operands' dtype."""
        weight, kind = self.weight, x.device.type
        if torch.is_autocast_enabled(kind):
            dtype = torch.get_autocast_dtype(kind)
            x, weight, a, b = (t.to(dtype) for t in (x, weight, a, b))
            bias = None if bias is None else bias.to(dtype)
        gelu, dropped = self.input_gelu, None
        if self.dropout and self.training:  # the adapters' dropout acts on GELU's output
            if gelu is not None:
                x, gelu = F.gelu(x, approximate=gelu), None
            dropped = F.dropout(x, self.dropout, training=True)
        return _LoraLinearFunction.apply(x, weight, bias, a, b, self.scaling, dropped, gelu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = self.tp_group
        a, b = self.lora_A.weight, self.lora_B.weight
        if self.kind == "column":
            x = copy_to_group(x, group)
            y = self._linear(x, self.bias, copy_to_group(a, group), b)
            return gather_from_group(y, group, -1) if self.gather_output else y
        if self.kind == "row" and group.world_size > 1:
            if not self.input_is_parallel:
                x = shard_to_group(x, group, -1)
            partial = self._linear(x, None, a, copy_to_group(b, group))
            y = reduce_from_group(partial, group, in_place=True)
            return y if self.bias is None else y + self.bias
        return self._linear(x, self.bias, a, b)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"rank={self.rank}, scaling={self.scaling:g}, {self.kind}, "
            f"tp={self.tp_group.world_size}"
            + ("" if self.input_gelu is None else f", input_gelu={self.input_gelu}")
        )


class _GeluInNextLayer(nn.Module):
    """diffusers' ``GELU`` projection whose activation the next layer (a
    :class:`LoraLinear` with ``input_gelu``) applies: ``proj`` only, under the same name."""

    def __init__(self, gelu: nn.Module) -> None:
        super().__init__()
        self.proj, self.approximate = gelu.proj, gelu.approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _move_gelus_into_adapters(model: nn.Module) -> None:
    """In every diffusers ``FeedForward`` (``net``: GELU, ``Dropout(0)``, linear) whose
    output linear is a :class:`LoraLinear`, let that layer apply the GELU: one
    ``[tokens, ffn_dim]`` tensor saved for backward instead of two, the same values."""
    for module in model.modules():
        net = getattr(module, "net", None)
        if not (isinstance(net, nn.ModuleList) and len(net) == 3):
            continue
        gelu, dropout, out = net
        if (
            type(gelu).__name__ == "GELU"
            and type(gelu).__module__.startswith("diffusers.")
            and gelu.approximate in ("tanh", "none")
            and isinstance(dropout, nn.Dropout)
            and dropout.p == 0
            and isinstance(out, LoraLinear)
        ):
            net[0] = _GeluInNextLayer(gelu)
            out.input_gelu = gelu.approximate


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or name.endswith("." + pattern) or fnmatch.fnmatchcase(name, pattern)


def _linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, _LINEARS)]


def _name_shapes(names: list[str]) -> list[str]:
    """Names with their first index folded (``blocks.*.attn1.to_q``), in first-seen order."""
    return list(dict.fromkeys(re.sub(r"\.\d+\.", ".*.", n, count=1) for n in names))


def match_targets(model: nn.Module, targets: Iterable[str]) -> list[str]:
    """The linear modules of ``model`` that the patterns name; ``ValueError`` for a pattern
    that names none (listing the linear modules there are) or a non-linear module."""
    linears = _linear_names(model)
    chosen: dict[str, None] = {}
    for pattern in targets:
        found = [n for n in linears if _matches(n, pattern)]
        if not found:
            others = [n for n, _ in model.named_modules() if n and _matches(n, pattern)]
            what = (
                f"it names {others[0]!r}, a {type(model.get_submodule(others[0])).__name__}, "
                "not a linear layer"
                if others
                else "it matches no module"
            )
            raise ValueError(
                f"LoRA target {pattern!r}: {what}. The model's linear layers are "
                f"{', '.join(_name_shapes(linears))} (set model.lora.targets to names or "
                "dotted suffixes of these)"
            )
        chosen.update(dict.fromkeys(found))
    return list(chosen)


def check_lora(model: nn.Module, settings: LoraSettings) -> list[str]:
    """The targeted module names, after checking that every pattern matches and that the
    rank fits every targeted layer (``ValueError`` otherwise). ``model`` may be on the meta
    device: only names and shapes are read."""
    names = match_targets(model, settings.targets)
    for name in names:
        layer = model.get_submodule(name)
        smaller = min(layer.in_features, layer.out_features)
        if settings.rank > smaller:
            raise ValueError(
                f"LoRA rank {settings.rank} is larger than the smaller side of {name} "
                f"([{layer.out_features}, {layer.in_features}]): a rank above {smaller} adds "
                "nothing. Lower model.lora.rank, or leave this layer out of model.lora.targets"
            )
    return names


def add_lora(model: nn.Module, settings: LoraSettings, seed: int = 0) -> list[str]:
    """Freeze ``model`` and put a :class:`LoraLinear` in place of every targeted linear
    (after :func:`vidpar.models.parallelize`, so tp layers are adapted as they are split);
    returns the adapted module names. Adapters are trainable, all else is frozen. A
    diffusers FeedForward's GELU moves into its adapted output layer (``input_gelu``)."""
    names = check_lora(model, settings)
    model.requires_grad_(False)
    for name in names:
        generator = torch.Generator().manual_seed(seed + zlib.crc32(name.encode()))
        layer = LoraLinear(
            model.get_submodule(name), settings.rank, settings.scaling, settings.dropout, generator
        )
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)
    _move_gelus_into_adapters(model)
    return names


def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The adapters' parameters by name (``<module>.lora_A.weight``, ``.lora_B.weight``)."""
    return {
        name: param
        for name, param in model.named_parameters()
        if name.endswith((".lora_A.weight", ".lora_B.weight"))
    }
