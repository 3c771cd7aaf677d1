"""Every public ``vidpar.nn`` layer, and the token shard/gather, in one process with no
layout and no torch.distributed: they run as the plain torch computation they stand for
(the groups are worlds of one), forward and backward."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from vidpar.distributed import get_ring_group, get_sp_group, model_parallel_is_initialized
from vidpar.distributed.communication_op import gather_sequence, shard_sequence
from vidpar.nn import (
    ColumnParallelLinear,
    DistributedAttention,
    DiTConfig,
    QKVParallelLinear,
    RowParallelLinear,
    TensorParallelModule,
    VideoDiT,
    ring_attention,
    shard_tokens,
)


@pytest.fixture(autouse=True)
def no_layout() -> None:
    assert not model_parallel_is_initialized() and not dist.is_initialized()


def x_with_grad(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64).requires_grad_()


def test_linears_are_plain_linears() -> None:
    torch.manual_seed(0)
    x = x_with_grad(2, 5, 8)
    for layer in (
        ColumnParallelLinear(8, 12, dtype=torch.float64),
        ColumnParallelLinear(8, 12, gather_output=True, dtype=torch.float64),
        RowParallelLinear(8, 12, dtype=torch.float64),
        RowParallelLinear(8, 12, input_is_parallel=False, dtype=torch.float64),
    ):
        assert isinstance(layer, TensorParallelModule) and layer.tp_group.world_size == 1
        assert layer.weight.shape == (12, 8)  # the full weight: nothing is split
        y = layer(x)
        torch.testing.assert_close(y, F.linear(x, layer.weight, layer.bias))
        (grad,) = torch.autograd.grad(y.square().sum(), x)
        torch.testing.assert_close(grad, 2 * y @ layer.weight, rtol=1e-12, atol=1e-12)


def test_qkv_projection_is_three_linears() -> None:
    torch.manual_seed(0)
    layer = QKVParallelLinear(16, 4, dtype=torch.float64)
    assert layer.weight.shape == (3, 16, 16) and layer.num_heads_per_rank == 4
    x = x_with_grad(2, 5, 16)
    for out, weight, bias in zip(layer(x), layer.weight, layer.bias, strict=True):
        torch.testing.assert_close(out, F.linear(x, weight, bias).unflatten(-1, (4, 4)))


def attention(q, k, v) -> torch.Tensor:
    """Plain softmax attention on ``[B, S, H, D]``."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)


def test_distributed_attention_is_softmax_attention() -> None:
    torch.manual_seed(0)
    layer = DistributedAttention(4)
    assert (layer.ulysses_group.world_size, layer.ring_group.world_size) == (1, 1)
    q, k, v = (x_with_grad(2, 7, 4, 8) for _ in range(3))
    joint_k, joint_v = x_with_grad(2, 3, 4, 8), x_with_grad(2, 3, 4, 8)
    torch.testing.assert_close(layer(q, k, v), attention(q, k, v))
    with_text = layer(q, k, v, joint_k=joint_k, joint_v=joint_v)
    torch.testing.assert_close(
        with_text, attention(q, torch.cat((k, joint_k), 1), torch.cat((v, joint_v), 1))
    )
    # seq_len=5: the last two tokens are padding, ignored as keys, zero as queries.
    padded = layer(q, k, v, seq_len=5)
    torch.testing.assert_close(padded[:, :5], attention(q[:, :5], k[:, :5], v[:, :5]))
    assert not padded[:, 5:].any()
    grads = torch.autograd.grad(with_text.sum(), (q, k, v, joint_k, joint_v))
    assert all(g.abs().sum() > 0 for g in grads)


def test_ring_attention_over_a_ring_of_one_is_softmax_attention() -> None:
    torch.manual_seed(0)
    q, k, v = (x_with_grad(1, 6, 2, 8) for _ in range(3))
    out = ring_attention(q, k, v, get_ring_group(), valid=[6])
    torch.testing.assert_close(out, attention(q, k, v))
    (grad,) = torch.autograd.grad(out.sum(), q)
    (expected,) = torch.autograd.grad(attention(q, k, v).sum(), q)
    torch.testing.assert_close(grad, expected)


def test_tokens_shard_and_gather_to_themselves() -> None:
    sp = get_sp_group()
    assert sp.world_size == 1
    x = x_with_grad(2, 7, 8)
    for shard in (shard_tokens, shard_sequence):
        h = shard(x, sp)
        assert h.shape == x.shape and torch.equal(h, x)
        out = gather_sequence(h * 2, sp, 7)
        assert torch.equal(out, 2 * x)
        (grad,) = torch.autograd.grad(out.sum(), x)
        assert torch.equal(grad, torch.full_like(x, 2.0))


def test_video_dit_trains_in_one_process() -> None:
    torch.manual_seed(0)
    config = DiTConfig(in_channels=3, hidden_size=32, num_heads=4, depth=1, num_classes=2)
    model = VideoDiT(config)
    x = torch.randn(2, 3, 2, 8, 8)
    out = model(x, torch.rand(2), torch.tensor([0, 2]))  # class 2: the null class
    assert out.shape == x.shape
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())
