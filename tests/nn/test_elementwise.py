"""The fused elementwise ops equal their textbook formulas: float64 to rounding, bfloat16
to the activation dtype's rounding, with results stored in the activation dtype."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vidpar.nn.dit import rope_angles
from vidpar.nn.elementwise import (
    _norm_rope_reference,
    _rope_reference,
    apply_rope,
    gated_residual,
    head_rms_norm,
    layer_norm_modulate,
    norm_rope,
    rope_tables,
)

#: Worst error allowed against the float64 formula, relative to the largest entry.
TOLERANCE = {torch.float64: 1e-12, torch.bfloat16: 2e-2}


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def check(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert actual.dtype == dtype
    error = (actual.double() - expected).abs().max() / expected.abs().max()
    assert error <= TOLERANCE[dtype], float(error)


def rope_formula(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Consecutive channel pairs (x0, x1) rotated by their angle."""
    x0, x1 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = angles.cos()[:, None], angles.sin()[:, None]
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), -1).flatten(-2)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_rope(dtype) -> None:
    angles = rope_angles((2, 3, 4), head_dim=12, theta=100.0)
    x = rand(2, 24, 3, 12)
    expected = rope_formula(x, angles)
    cos, sin = rope_tables(angles, dtype)
    assert cos.dtype == sin.dtype == torch.promote_types(dtype, torch.float32)
    xq = x.to(dtype)
    check(apply_rope(xq, cos, sin), expected, dtype)  # eager
    check(_rope_reference(xq, cos, sin), expected, dtype)  # what torch.compile fuses
    strided = torch.stack((xq, xq), dim=2)[:, :, 0]  # a non-contiguous view, as q of QKV
    check(apply_rope(strided, cos, sin), expected, dtype)


def test_rope_gradient_is_the_inverse_rotation() -> None:
    angles = rope_angles((2, 2, 3), head_dim=8)
    cos, sin = rope_tables(angles, torch.float64)
    x = rand(1, 12, 2, 8).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: apply_rope(t, cos, sin), (x,))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_norms_modulation_and_residual(dtype) -> None:
    x, y = rand(2, 5, 3, 8, seed=1), rand(2, 5, 3, 8, seed=2)
    weight = 1 + 0.1 * rand(3, 8, seed=3)
    rms = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-6) * weight
    check(head_rms_norm(x.to(dtype), weight.to(dtype), 1e-6), rms, dtype)

    tokens = x.flatten(-2)
    shift, scale = rand(2, 1, 24, seed=4), rand(2, 1, 24, seed=5)
    mean = tokens.mean(-1, keepdim=True)
    normed = (tokens - mean) * torch.rsqrt(tokens.var(-1, unbiased=False, keepdim=True) + 1e-6)
    expected = normed * (1 + scale) + shift
    got = layer_norm_modulate(tokens.to(dtype), shift.to(dtype), scale.to(dtype), 1e-6)
    check(got, expected, dtype)
    check(got, F.layer_norm(tokens, (24,), eps=1e-6) * (1 + scale) + shift, dtype)

    gate = rand(2, 1, 24, seed=6)
    other = y.flatten(-2)
    check(
        gated_residual(tokens.to(dtype), gate.to(dtype), other.to(dtype)),
        tokens + gate * other,
        dtype,
    )


def _norm_rope_formula(x: torch.Tensor, weight: torch.Tensor, angles: torch.Tensor):
    normed = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-6) * weight
    return rope_formula(normed, angles)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_norm_rope_and_the_math_inductor_fuses_on_cuda(dtype) -> None:
    x, weight = rand(2, 5, 3, 8, seed=10), 1 + 0.1 * rand(3, 8, seed=11)
    angles = rope_angles((1, 1, 5), 8, 100.0).double()  # [5, 4]
    cos, sin = rope_tables(angles, dtype)
    expected = _norm_rope_formula(x, weight, angles)
    xd, wd = x.to(dtype), weight.to(dtype)
    check(norm_rope(xd, wd, 1e-6, cos, sin), expected, dtype)
    check(_norm_rope_reference(xd, wd, 1e-6, cos, sin), expected, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("with_rope", [False, True], ids=["norm", "norm_rope"])
def test_the_fused_cuda_kernels_equal_the_formulas_with_their_gradients(with_rope) -> None:
    """On CUDA (inductor's kernels) and the strided view a fused QKV projection gives."""
    qkv = rand(2, 64, 3 * 4 * 32, seed=7).requires_grad_()
    weight = (1 + 0.1 * rand(4, 32, seed=8)).requires_grad_()
    grad = rand(2, 64, 4, 32, seed=9)
    angles = rope_angles((1, 8, 8), 32, 100.0).double()  # 64 tokens

    def view(t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(-1, (3, 4, 32))[:, :, 0]

    if with_rope:
        expected = _norm_rope_formula(view(qkv), weight, angles)
    else:
        expected = view(qkv) * torch.rsqrt(view(qkv).square().mean(-1, keepdim=True) + 1e-6)
        expected = expected * weight
    expected_grads = torch.autograd.grad(expected, (qkv, weight), grad)
    qkv_cuda = qkv.detach().to("cuda", torch.bfloat16).requires_grad_()
    weight_cuda = weight.detach().to("cuda", torch.bfloat16).requires_grad_()
    if with_rope:
        cos, sin = (t.cuda() for t in rope_tables(angles.float(), torch.bfloat16))
        got = norm_rope(view(qkv_cuda), weight_cuda, 1e-6, cos, sin)
    else:
        got = head_rms_norm(view(qkv_cuda), weight_cuda, 1e-6)
    check(got.cpu(), expected, torch.bfloat16)
    grads = torch.autograd.grad(got, (qkv_cuda, weight_cuda), grad.to("cuda", torch.bfloat16))
    for actual, wanted in zip(grads, expected_grads, strict=True):
        check(actual.cpu(), wanted, torch.bfloat16)
