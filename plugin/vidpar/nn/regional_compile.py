"""Regional compilation: a model's repeated transformer block compiled once.

Every block of a model runs the same code on parameters of the same shapes, so one
``torch.compile`` of the block serves all of them (parameters are graph inputs): the
compile time is one block's, not the model's. Collectives inside a block (tp, Ulysses,
Ring) are traced as custom ops (:mod:`vidpar.distributed.collective_ops`; the ring's whole
exchange-and-merge is one op of :mod:`vidpar.nn.ring_attention`), so a block is one graph under
every layout (``{"fullgraph": True}`` holds) and inductor schedules around them.

The setting, everywhere vidpar offers it (``DiTConfig.compile``,
``vidpar.models.parallelize(compile=...)``): ``False``; ``True`` (inductor); the name
of a ``torch.compile`` backend (``"aot_eager"``: cheap, for tests); or a dict of
``torch.compile`` options. Shapes are static (``dynamic=False``) unless the dict says
otherwise.

Activation checkpointing (:mod:`vidpar.nn.activation_checkpointing`) wraps the compiled
block: the backward runs the compiled forward again, then the compiled backward. Traced
into the block instead, the full recomputation measured no faster and 0.64 GiB higher at
the peak (Wan2.1-1.3B sizes, one H100); ``"keep_attention"`` is traced into the block,
where its policy sees the attention kernels among the graph's ops.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from vidpar.nn.activation_checkpointing import CheckpointSetting, recomputing

__all__ = ["CompileSetting", "block_runner", "compile_options"]

CompileSetting = bool | str | Mapping[str, Any]


def compile_options(setting: CompileSetting) -> dict[str, Any] | None:
    """The ``torch.compile`` keyword arguments of a compile setting; ``None``: off."""
    if setting is False or setting is None:
        return None
    if setting is True:
        options: dict[str, Any] = {}
    elif isinstance(setting, str):
        options = {"backend": setting}
    elif isinstance(setting, Mapping):
        options = dict(setting)
    else:
        raise TypeError(
            f"compile must be a bool, a torch.compile backend name or a dict of its "
            f"options, got {setting!r}"
        )
    return {"dynamic": False, **options}


def _call(block: nn.Module, *args: Any) -> Any:
    return block(*args)


@functools.cache
def _compiled_call(
    options: tuple[tuple[str, Any], ...], checkpointing: CheckpointSetting
) -> Callable[..., Any]:
    return torch.compile(recomputing(_call, checkpointing), **dict(options))


def block_runner(
    setting: CompileSetting, checkpointing: CheckpointSetting = False
) -> Callable[..., Any]:
    """``run(block, *args)``: ``block(*args)``, compiled under ``setting`` and
    checkpointed under ``checkpointing``. The compiled
    function is one per setting, shared by every block and model, so a block class is
    traced once per input shape; the model itself stays uncompiled (its copies and
    pickles hold no compiled state)."""
    options = compile_options(setting)
    if options is None:
        return recomputing(_call, checkpointing)
    key = tuple(sorted(options.items()))
    if checkpointing == "keep_attention":
        return _compiled_call(key, checkpointing)
    return recomputing(_compiled_call(key, False), checkpointing)
