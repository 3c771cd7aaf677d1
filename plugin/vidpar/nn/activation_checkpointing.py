"""Activation checkpointing of a model's blocks: what each block keeps for its backward.

The setting (``DiTConfig.activation_checkpointing``):

* ``False``: every activation is kept (fastest, the most memory);
* ``True``: only the block's inputs; the backward recomputes the rest, collectives
  included (about a third more compute);
* ``"keep_attention"``: the inputs and the self-attention kernels' outputs and
  log-sum-exps (:func:`torch.utils.checkpoint.create_selective_checkpoint_contexts`),
  so the recomputation skips a block's costliest kernel: about an attention forward less
  per block, for one more activation per block of memory (at Wan2.1-1.3B's 32,760
  tokens, 100 MB a block). Attention to fewer keys than queries (cross-attention to a
  short text) is cheap and recomputed. Not with ring attention, whose merge writes into
  its first block's output.

Under regional compilation (:mod:`vidpar.nn.regional_compile`) ``True`` checkpoints the
compiled block and ``"keep_attention"`` is traced into it. On one H100 at Wan2.1-1.3B's
sizes, compiled, forward + backward took 2.395 s with ``True`` and 2.038 s with
``"keep_attention"``, at a peak of 8.93 against 11.12 GiB (``benchmarks/BENCHMARKS.md``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

__all__ = ["CHECKPOINTING", "CheckpointSetting", "check_checkpointing", "recomputing"]

CheckpointSetting = bool | str
#: ``activation_checkpointing`` values.
CHECKPOINTING: tuple[CheckpointSetting, ...] = (False, True, "keep_attention")

_aten = torch.ops.aten
_FUSED_ATTENTION = frozenset(
    {
        _aten._scaled_dot_product_cudnn_attention.default,
        _aten._scaled_dot_product_flash_attention.default,
        _aten._scaled_dot_product_efficient_attention.default,
        _aten._scaled_dot_product_flash_attention_for_cpu.default,
    }
)


def check_checkpointing(setting: Any, ring: int = 1) -> None:
    """Raise ``ValueError`` unless ``setting`` is one of :data:`CHECKPOINTING` and works
    with a ring of size ``ring``."""
    if not (isinstance(setting, bool) or setting == "keep_attention"):
        raise ValueError(
            f"activation_checkpointing must be one of {CHECKPOINTING}, got {setting!r}"
        )
    if setting == "keep_attention" and ring > 1:
        raise ValueError(
            f"activation_checkpointing='keep_attention' does not work with ring attention "
            f"(ring {ring}), whose merge writes into the kept outputs; use true"
        )


def _keep_self_attention(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    """Save a fused attention kernel's outputs when it attends to at least as many keys
    as queries; recompute everything else."""
    if op in _FUSED_ATTENTION and args[1].shape[-2] >= args[0].shape[-2]:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _keep_attention_contexts() -> Any:
    return create_selective_checkpoint_contexts(_keep_self_attention)


@functools.cache
def recomputing(fn: Callable[..., Any], setting: CheckpointSetting) -> Callable[..., Any]:
    """``fn`` under the checkpointing ``setting`` (``fn`` itself when it is ``False``)."""
    check_checkpointing(setting)
    if setting is False:
        return fn
    options: dict[str, Any] = {"use_reentrant": False}
    if setting == "keep_attention":
        options["context_fn"] = _keep_attention_contexts

    def run(*args: Any) -> Any:
        return checkpoint(fn, *args, **options)

    return run
