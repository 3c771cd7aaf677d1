"""The elementwise work between a DiT block's matmuls, in the activation dtype.

Each op computes in float32 per element where precision needs it (or in the input's
dtype when that is wider) and stores its result in the activation dtype, so no
full-size float32 copy of an activation is made. Under ``torch.compile`` each is a
handful of pointwise ops that inductor fuses into the neighbouring kernels; in eager mode
each is one or two kernels:

* :func:`apply_rope`: rotary embedding from interleaved tables (:func:`rope_tables`);
  eagerly a custom autograd function that writes the rotation straight into the
  activation dtype and saves nothing but the tables (its backward is the inverse
  rotation).
* :func:`head_rms_norm`: RMSNorm over each head's channels with a per-head weight, and
  :func:`norm_rope` (the norm, then the rotation). On CUDA in eager mode each is one kernel
  that inductor generates (compiled on first use), forward and backward.
* :func:`layer_norm_modulate`: ``LayerNorm(x) · (1 + scale) + shift`` (adaLN).
* :func:`gated_residual`: ``x + gate · y``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = [
    "apply_rope",
    "gated_residual",
    "head_rms_norm",
    "inductor_kernel",
    "layer_norm_modulate",
    "norm_rope",
    "rope_tables",
    "uses_inductor_kernels",
]


def rope_tables(angles: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)`` tables ``[S, 1, D]`` of rotary angles ``[S, D/2]`` for activations
    of ``dtype``: each angle repeated for its channel pair, the sine signed ``(-sin,
    +sin)``, in float32 (float64 for float64 activations)."""
    table_dtype = torch.promote_types(dtype, torch.float32)
    cos = torch.cos(angles).repeat_interleave(2, dim=-1)
    sin = torch.sin(angles)
    sin = torch.stack((-sin, sin), dim=-1).flatten(-2)
    return cos[:, None].to(table_dtype), sin[:, None].to(table_dtype)


def _rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The rotation as pointwise ops in the tables' precision (inductor fuses them)."""
    pairs = x.to(cos.dtype).unflatten(-1, (-1, 2))
    swapped = pairs.flip(-1).flatten(-2)
    return (pairs.flatten(-2) * cos + swapped * sin).to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x · cos + swap(x) · sin`` computed in the tables' precision, stored in ``x``'s
    dtype (the ``out=`` kernels cast per element)."""
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    torch.mul(x, cos, out=out)
    swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    return torch.addcmul(out, swapped, sin, out=out)


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, -sin), None, None  # the inverse rotation


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive channel pairs of ``x`` ``[B, S, H, D]`` by the tables of
    :func:`rope_tables` (``[S, 1, D]``)."""
    if torch.compiler.is_compiling():
        return _rope_reference(x, cos, sin)
    return _Rope.apply(x, cos, sin)


def _normalized(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The norm times the weight, in float32 (or wider): pointwise ops and one reduction."""
    x32 = x.to(torch.promote_types(x.dtype, torch.float32))
    return x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + eps) * weight


def _head_rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _normalized(x, weight, eps).to(x.dtype)


def _norm_rope_reference(
    x: torch.Tensor, weight: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor:
    return _rope_reference(_normalized(x, weight, eps), cos, sin).to(x.dtype)


@functools.cache
def inductor_kernel(reference: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``reference`` (pointwise ops and small reductions) compiled by inductor: one kernel
    forward, one backward."""
    return torch.compile(reference)


def uses_inductor_kernels(x: torch.Tensor) -> bool:
    """Eager CUDA work that gets inductor's kernels (:func:`inductor_kernel`) instead of a
    chain of eager ones: torch's ``rms_norm`` is slow on rows as short as a head, and
    norm, weight and RoPE are eagerly 5 kernels (one H200, 32,760 × 12 × 128 bf16: 480 µs
    for norm × weight against 122 µs compiled; ``benchmarks/head_norm_kernels.py``)."""
    return (
        x.is_cuda
        and not torch.compiler.is_compiling()  # a compiled caller fuses the reference
        and _ampere_or_newer(x.device.index)
    )


@functools.cache
def _ampere_or_newer(index: int | None) -> bool:
    """Ampere or newer (what inductor's Triton kernels here are tested on); asked once."""
    return torch.cuda.get_device_capability(index) >= (8, 0)


def head_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim of ``x`` ``[..., H, D]`` (accumulated in float32), times
    ``weight`` ``[H, D]``; on CUDA one fused kernel."""
    if uses_inductor_kernels(x):
        return inductor_kernel(_head_rms_norm_reference)(x, weight, eps)
    if torch.compiler.is_compiling():
        return _head_rms_norm_reference(x, weight, eps)
    return F.rms_norm(x, x.shape[-1:], eps=eps) * weight


def norm_rope(
    x: torch.Tensor, weight: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor:
    """:func:`head_rms_norm`, then :func:`apply_rope`; on CUDA one fused kernel."""
    if uses_inductor_kernels(x):
        return inductor_kernel(_norm_rope_reference)(x, weight, eps, cos, sin)
    return apply_rope(head_rms_norm(x, weight, eps), cos, sin)


def layer_norm_modulate(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float
) -> torch.Tensor:
    """``LayerNorm(x) · (1 + scale) + shift`` over the last dim (no affine weights), the
    modulation fused into one multiply-add; ``shift``/``scale`` broadcast over tokens."""
    return torch.addcmul(shift, F.layer_norm(x, x.shape[-1:], eps=eps), 1 + scale)


def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x + gate · y`` in one multiply-add."""
    return torch.addcmul(x, gate, y)
