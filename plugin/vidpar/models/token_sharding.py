"""Where a model's tokens are split over sp and gathered back, in diffusers' ``_cp_plan``
terms: :class:`Split` (~ ``ContextParallelInput``) of a module's inputs or outputs (the
video tokens, the rotary embedding, any per-token conditioning), :class:`Gather` (~
``ContextParallelOutput``) of a module's output, and the forward hooks that do both
(:class:`TokenHooks`).

Module paths are dotted, ``""`` the model itself, and ``*`` stands for one path
component (diffusers' ``blocks.*``, ``blocks.*.attn1``). Splits end-pad to a multiple of
sp (:func:`~vidpar.nn.dit.shard_tokens`), so no token count needs to divide sp; the true
count of the forward in flight is kept in a :class:`SequenceLength`, which the attention
reads so padded keys are ignored, and which says whether the token stream is sharded at
the moment: from the first split of a module's input until a gather (diffusers' plans
split the token stream at inputs and tables such as the rotary embedding at outputs), so
an attention over whole tokens before the split (a text refiner) stays local.

Gradients follow vidpar's rule for sp: a sharded tensor's gradient is whole for its
tokens, a replicated tensor's (and parameter's) is this rank's share, which the gradient
reduction sums over sp. A plan that gathers at the output keeps it with plain splits and
gathers; one that splits the tokens again after a gather (Helios) runs layers whole on
every rank in between, and keeps it by dividing the output's gradient by sp and summing
each gather's gradient over sp.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vidpar.distributed.communication_op import gather_sequence
from vidpar.distributed.group import GroupCoordinator
from vidpar.nn.dit import shard_tokens
from vidpar.nn.linear import GroupRef

__all__ = ["Gather", "SequenceLength", "Split", "TokenHooks", "TokenPlan", "cp_plan_tokens"]


@dataclass(frozen=True)
class Split:
    """Split a tensor (or each tensor of a tuple) over sp along ``dim``: a forward input
    (keyed by argument name) or, with ``output``, a module output (keyed by its index, or
    ``None`` for the whole output). A tensor of other than ``ndim`` dims is left whole
    (Wan's timestep: split only when there is one per token)."""

    dim: int
    ndim: int | None = None
    output: bool = False


@dataclass(frozen=True)
class Gather:
    """Gather a module's output over sp along ``dim`` (unpadded to the true length)."""

    dim: int


#: ``{module path ("" the model): {argument name or output index: Split} | Gather}``; a
#: tuple argument may take a tuple of Splits, one per item (an item's ``output`` Split
#: leaves it whole, as in diffusers).
TokenPlan = Mapping[str, Mapping[str | int | None, Split | tuple[Split, ...]] | Gather]


class SequenceLength:
    """The true (unpadded) token count of the forward in flight, set by the splits and
    read by the processors and the gathers; and whether the token stream is sharded now
    (``sharded``: from a split of a module's input until a gather)."""

    def __init__(self) -> None:
        self.value: int | None = None
        self.sharded = False

    def get(self) -> int:
        if self.value is None:
            raise RuntimeError(
                "no tokens were split in this forward: call the whole parallelised model, "
                "not one of its blocks on its own"
            )
        return self.value

    def record(self, length: int) -> None:
        if self.value is not None and self.value != length:
            raise ValueError(
                f"this forward splits sequences of {self.value} and {length} tokens; a "
                "plan's splits must all be of the video tokens"
            )
        self.value = length

    def start(self) -> None:
        """A new forward: nothing split yet."""
        self.value, self.sharded = None, False


def cp_plan_tokens(model: nn.Module, whole: tuple[str, ...]) -> TokenPlan:
    """The token splits and gathers of the model class's diffusers ``_cp_plan``, the
    inputs named in ``whole`` left out (vidpar replicates the text on every sp rank)."""
    cp_plan = getattr(type(model), "_cp_plan", None)
    if not cp_plan:
        raise TypeError(
            f"{type(model).__name__} has no vidpar token plan and no diffusers _cp_plan"
        )
    tokens: dict[str, Any] = {}
    for path, entry in cp_plan.items():
        if hasattr(entry, "gather_dim"):
            tokens[path] = Gather(entry.gather_dim)
            continue
        if isinstance(entry, list | tuple):
            raise ValueError(
                f"{type(model).__name__}'s _cp_plan gathers the items of {path!r}'s tuple output "
                "one by one, which vidpar does not do yet: give the class a vidpar plan "
                "(README 'Bring your diffusers model')"
            )
        splits: dict[Any, Split | tuple[Split, ...]] = {}
        for key, spec in entry.items():
            if key in whole:
                continue
            if isinstance(spec, list | tuple):  # one per item of a tuple argument
                splits[key] = tuple(
                    Split(s.split_dim, s.expected_dims, s.split_output) for s in spec
                )
            else:
                splits[key] = Split(spec.split_dim, spec.expected_dims, spec.split_output)
        if splits:
            tokens[path] = splits
    return tokens


def _modules_at(model: nn.Module, path: str) -> list[nn.Module]:
    """The module at a token plan's ``path``; with ``*`` (diffusers' ``blocks.*``), every
    module whose path matches, ``*`` standing for one path component."""
    if "*" not in path:
        return [model.get_submodule(path)]
    pattern = re.compile(r"[^.]+".join(re.escape(part) for part in path.split("*")))
    modules = [m for name, m in model.named_modules() if pattern.fullmatch(name)]
    if not modules:
        raise ValueError(f"{type(model).__name__} has no module at the token plan's {path!r}")
    return modules


class TokenHooks:
    """The forward hooks on ``model`` that split its tokens over ``sp`` and gather them
    back as ``tokens`` says, keeping ``length`` for the forward in flight."""

    def __init__(
        self, model: nn.Module, tokens: TokenPlan, sp: GroupCoordinator, length: SequenceLength
    ) -> None:
        self._sp = GroupRef(sp)
        self.length = length
        self._splits = 0  # tensors split so far
        self._gathered = False  # in the forward in flight
        self._model = type(model).__name__
        #: The tokens split again after a gather (Helios), as the first forward found.
        self.resplits = False
        model.register_forward_pre_hook(self._start, prepend=True)
        model.register_forward_hook(self._shares_of_the_output_gradient)
        for path, entry in tokens.items():
            for module in _modules_at(model, path):
                self._hook(module, entry)

    def _hook(self, module: nn.Module, entry: Any) -> None:
        if isinstance(entry, Gather):
            module.register_forward_hook(self._gather(entry))
            return
        outputs = {k: s for k, s in entry.items() if isinstance(s, Split) and s.output}
        inputs = {k: s for k, s in entry.items() if k not in outputs}
        if inputs:
            hook = self._split_inputs(inspect.signature(module.forward), inputs)
            module.register_forward_pre_hook(hook, with_kwargs=True)
        if outputs:
            module.register_forward_hook(self._split_outputs(outputs))

    def _start(self, module: nn.Module, args: tuple) -> None:
        self.length.start()
        self._gathered = False

    def _after_gather(self, first: list[bool]) -> bool:
        """Whether a hook's split follows a gather in the forward, as its first call found
        (a block recomputed in the backward, after the gather, keeps its place)."""
        if not first:
            first.append(self._gathered)
        return first[0]

    def _split(self, value: Any, split: Split | tuple[Split, ...], after_gather: bool) -> Any:
        if isinstance(split, tuple):
            if not isinstance(value, tuple | list) or len(value) != len(split):
                raise ValueError(
                    f"{self._model}'s token plan splits a tuple of {len(split)} items "
                    f"item by item, but the argument is {type(value).__name__} of "
                    f"{len(value) if isinstance(value, tuple | list) else 1}"
                )
            return type(value)(
                v if s.output else self._split(v, s, after_gather)
                for v, s in zip(value, split, strict=True)
            )
        if isinstance(value, tuple | list):
            return type(value)(self._split(v, split, after_gather) for v in value)
        if not isinstance(value, torch.Tensor) or (split.ndim and value.ndim != split.ndim):
            return value
        self.length.record(value.shape[split.dim])
        self._splits += 1
        self.resplits |= after_gather
        return shard_tokens(value, self._sp.group, split.dim)

    def _shares_of_the_output_gradient(self, module: nn.Module, args: tuple, output: Any) -> Any:
        """Where the tokens split again after a gather (Helios' ``blocks.*.attn1``), layers
        run whole on every rank between the gathers and after the last; for their
        gradients to be shares that the sum over sp makes whole (as every replicated
        parameter's are), the output's gradient is divided by sp, and each gather sums
        its gradient over sp (:class:`_SummedIfResplit`)."""
        sp = self._sp.group.world_size
        if not self.resplits or sp == 1:
            return output
        return _map_tensors(output, lambda t: _ScaledGradient.apply(t, 1.0 / sp))

    def _split_inputs(self, signature: inspect.Signature, splits: dict) -> Callable:
        first: list[bool] = []

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            bound = signature.bind_partial(*args, **kwargs)
            before, after_gather = self._splits, self._after_gather(first)
            for name, split in splits.items():
                if name in bound.arguments:
                    value = bound.arguments[name]
                    bound.arguments[name] = self._split(value, split, after_gather)
            self.length.sharded |= self._splits > before
            return bound.args, bound.kwargs

        return hook

    def _split_outputs(self, splits: dict) -> Callable:
        first: list[bool] = []

        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            after_gather = self._after_gather(first)
            if None in splits:
                return self._split(output, splits[None], after_gather)
            items = list(output)
            for index, split in splits.items():
                items[index] = self._split(items[index], split, after_gather)
            return type(output)(items)

        return hook

    def _gather(self, gather: Gather) -> Callable:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            self.length.sharded, self._gathered = False, True
            sp = self._sp.group
            whole = gather_sequence(output, sp, self.length.get(), gather.dim)
            return whole if sp.world_size == 1 else _SummedIfResplit.apply(whole, self)

        return hook


class _SummedIfResplit(torch.autograd.Function):
    """Identity; the backward sums the gradient over sp where the plan splits the tokens
    again after a gather (then the gradients of the layers after the gather are each
    rank's share), else passes it on."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, hooks: TokenHooks) -> torch.Tensor:
        ctx.hooks = hooks
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        hooks = ctx.hooks
        if hooks.resplits:
            grad = hooks._sp.group.all_reduce(grad.contiguous().clone())
        return grad, None


class _ScaledGradient(torch.autograd.Function):
    """Identity; the backward scales the gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.scale, None


def _map_tensors(output: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``output`` (a tensor, a tuple or list, or diffusers' output dict) with ``fn``
    applied to each tensor."""
    if isinstance(output, torch.Tensor):
        return fn(output)
    if isinstance(output, tuple | list):
        return type(output)(_map_tensors(o, fn) for o in output)
    if isinstance(output, Mapping):
        for key in list(output.keys()):
            output[key] = _map_tensors(output[key], fn)
    return output
