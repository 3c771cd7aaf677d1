"""Frozen weights held in autocast's dtype: the memory of mixed-precision LoRA.

Under mixed precision (Lightning's ``bf16-mixed`` or ``16-mixed``) a trainable weight keeps
its float32 master copy, but a frozen one gains nothing from it: autocast casts a linear's
or a convolution's float32 weight to its dtype at every use, so a weight held in that
dtype gives the same numbers, bit for bit, in half the memory (2.6 GiB of Wan2.1-1.3B's
5.3 GiB of weights; 28 of Wan2.1-14B's 57). diffusers' own LoRA training scripts cast
their frozen weights to half precision for the same reason.

Only the ``weight`` of the layers whose forward multiplies it under autocast (linears,
convolutions, LoRA's base, vidpar's parallel linears) is cast: a bias may be added outside
the matmul (a row-parallel linear under tp adds it after the all-reduce, in the type
promotion of an ``add``), and the modules a diffusers model keeps in float32
(``_keep_in_fp32_modules``: Wan's time embedder reads its own dtype to cast the timestep)
stay as they are.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from vidpar.nn.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from vidpar.nn.lora_layers import LoraLinear

#: Layers whose ``weight`` enters an autocast matmul or convolution in every forward.
AUTOCAST_MATMUL_LAYERS = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    ColumnParallelLinear,
    RowParallelLinear,
    QKVParallelLinear,
    LoraLinear,
)
#: Lightning's mixed precisions and the dtype their autocast computes in.
MIXED_PRECISION_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def cast_frozen_weights_for_autocast(
    model: nn.Module, dtype: torch.dtype, keep: Iterable[str] | None = None
) -> int:
    """Hold the frozen float32 ``weight`` of every layer of :data:`AUTOCAST_MATMUL_LAYERS`
    in ``dtype`` (autocast's), except in modules whose dotted name has a part in ``keep``
    (by default the model's ``_keep_in_fp32_modules``, as diffusers reads it). Returns the
    bytes freed."""
    if keep is None:
        keep = getattr(model, "_keep_in_fp32_modules", None) or ()
    keep = set(keep)
    freed = 0
    for name, module in model.named_modules():
        if not isinstance(module, AUTOCAST_MATMUL_LAYERS) or keep & set(name.split(".")):
            continue
        weight = module.weight
        if weight.requires_grad or weight.dtype != torch.float32:
            continue
        freed += weight.numel() * (weight.element_size() - dtype.itemsize)
        weight.data = weight.data.to(dtype)  # the same Parameter: its tp metadata stays
    return freed
