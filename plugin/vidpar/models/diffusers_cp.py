"""A diffusers model class with a ``_cp_plan`` but no vidpar plan, run sequence parallel from
diffusers' own declarations alone.

diffusers says two things about such a class: where its tokens split and gather (the
class's ``_cp_plan``, wildcards such as ``blocks.*`` and the rotary tables' tuple outputs
included, which :func:`~vidpar.models.token_sharding.cp_plan_tokens` reads), and which
of its attention calls span the whole sequence: its own processors pass their
``_parallel_config`` to ``dispatch_attention_fn`` for exactly those calls (the
self-attention; a cross-attention to the text passes ``None``). vidpar puts a
:class:`ContextParallelAttention` where diffusers would put its ``ParallelConfig``, and
the ``dispatch_attention_fn`` of the processor's module hands the calls that carry one,
from a processor that found the token stream sharded at its first call
(:class:`~vidpar.models.token_sharding.SequenceLength`), to
:class:`~vidpar.nn.attention.DistributedAttention` (Ulysses, Ring or USP, padded keys
ignored). A call on whole tokens (MiniMax-H3's text refiner, which runs before the split)
goes to diffusers' function without the parallel config, as in one process; so does
every other call, and every call of a model not parallelised by vidpar. The processors
themselves, their projections, norms and rotary embeddings, stay diffusers'.

Tensor parallelism needs to know which layers split, which diffusers does not say: such a
class runs sp, cfg and dp layouts, and tp is refused by name (:func:`refuse_tp`).
"""

from __future__ import annotations

import copy
import sys
from typing import Any

import torch
from torch import nn

from vidpar.distributed.state import ParallelState
from vidpar.models.token_sharding import SequenceLength
from vidpar.nn.attention import DistributedAttention
from vidpar.nn.linear import GroupRef

__all__ = ["ContextParallelAttention", "refuse_tp", "route_context_parallel"]


class ContextParallelAttention:
    """What a diffusers processor passes as ``parallel_config`` under vidpar (one copy per
    processor): its call with diffusers' ``dispatch_attention_fn`` arguments runs the
    distributed attention over the sp-sharded tokens (``length``: the true token count of
    the forward, and whether the tokens are sharded now)."""

    def __init__(self, num_heads: int, state: ParallelState, length: SequenceLength) -> None:
        self.num_heads = num_heads
        self.length = length
        self._ulysses = GroupRef(state.group("ulysses"))  # copies share the groups
        self._ring = GroupRef(state.group("ring"))
        self._by_scale: dict[float | None, DistributedAttention] = {}
        self._over_sharded: bool | None = None

    def over_sharded_tokens(self) -> bool:
        """Whether this processor attends the sp-sharded tokens: as they were at its first
        call (a block that diffusers' gradient checkpointing recomputes in the backward,
        after the gather, keeps its place)."""
        if self._over_sharded is None:
            self._over_sharded = self.length.sharded
        return self._over_sharded

    def __call__(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        enable_gqa: bool = False,
        attention_kwargs: dict | None = None,
        *,
        backend: Any = None,
    ) -> torch.Tensor:
        unsupported = {
            "attn_mask": attn_mask is not None,
            "is_causal": is_causal,
            "dropout_p": dropout_p != 0.0,
            "enable_gqa": enable_gqa or key.shape[2] != query.shape[2],
            "attention_kwargs": bool(attention_kwargs),
        }
        named = [name for name, present in unsupported.items() if present]
        if named:
            raise ValueError(
                f"the model's context-parallel attention was called with {', '.join(named)}: "
                "vidpar's sequence-parallel attention from a diffusers _cp_plan takes plain "
                "softmax attention over all tokens only; give the class a vidpar plan "
                "(README 'Bring your diffusers model')"
            )
        attention = self._by_scale.get(scale)
        if attention is None:
            attention = DistributedAttention(
                self.num_heads,
                scale=scale,
                ulysses_group=self._ulysses.group,
                ring_group=self._ring.group,
            )
            self._by_scale[scale] = attention
        return attention(query, key, value, seq_len=self.length.get())


def _dispatch_through_vidpar(module_name: str) -> None:
    """Make the ``dispatch_attention_fn`` the processors of ``module_name`` call hand
    :class:`ContextParallelAttention` configs to it (once per module; calls without one
    reach diffusers' function unchanged)."""
    module = sys.modules[module_name]
    original = getattr(module, "dispatch_attention_fn", None)
    if original is None:
        raise TypeError(
            f"the attention processors of {module_name} do not call diffusers' "
            "dispatch_attention_fn, so its _cp_plan alone does not say how their attention "
            "splits: give the class a vidpar plan (README 'Bring your diffusers model')"
        )
    if getattr(original, "vidpar_routes", False):
        return

    def dispatch_attention_fn(*args: Any, parallel_config: Any = None, **kwargs: Any) -> Any:
        if isinstance(parallel_config, ContextParallelAttention):
            if parallel_config.over_sharded_tokens():
                return parallel_config(*args, **kwargs)
            parallel_config = None  # whole tokens on every rank: one process's attention
        return original(*args, parallel_config=parallel_config, **kwargs)

    dispatch_attention_fn.vidpar_routes = True
    module.dispatch_attention_fn = dispatch_attention_fn


def route_context_parallel(model: nn.Module, attention: ContextParallelAttention) -> int:
    """Give every diffusers attention processor of ``model`` a copy of ``attention`` as its
    ``_parallel_config`` (a processor that several modules share is copied first, so each
    knows its own place); returns how many processors."""
    routed, seen = 0, set()
    for module in model.modules():
        processor = getattr(module, "processor", None)
        if processor is None or not hasattr(type(processor), "_parallel_config"):
            continue
        _dispatch_through_vidpar(type(processor).__module__)
        if id(processor) in seen:
            module.processor = processor = copy.copy(processor)
        seen.add(id(processor))
        processor._parallel_config = copy.copy(attention)
        routed += 1
    if not routed:
        raise TypeError(
            f"{type(model).__name__} has a diffusers _cp_plan but no attention processor "
            "that takes a parallel config: give the class a vidpar plan (README 'Bring your "
            "diffusers model')"
        )
    return routed


def refuse_tp(model: nn.Module, tp: int) -> None:
    """Raise unless ``tp`` is 1: diffusers' ``_cp_plan`` says nothing of tp."""
    if tp > 1:
        raise ValueError(
            f"{type(model).__name__} runs from its diffusers _cp_plan alone, which splits "
            f"tokens, not layers: sequence parallelism (ulysses, ring, both), cfg and dp work, "
            f"tp({tp}) does not; set parallel.tp=1 (or add a vidpar plan for the class: "
            "README 'Bring your diffusers model')"
        )
