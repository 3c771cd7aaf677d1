"""Tensor-parallel linears and full checkpoints against the single-device model.

The reference is the same module built inside ``single_process()`` after the same seed:
layers draw the full tensor and keep their chunk, so the parallel model starts with the
single-device weights and nothing is copied. Gradients of tp-sharded parameters are
compared with the matching chunk of the reference gradient; replicated parameters get
the full gradient on every tp rank.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from vidpar.config import ParallelConfig
from vidpar.distributed import single_process
from vidpar.distributed import state as ps
from vidpar.distributed.full_weights import (
    full_state_dict,
    load_full_state_dict,
    load_full_weights,
    save_full_weights,
)
from vidpar.nn import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear


class Block(nn.Module):
    """Every layer kind: QKV -> attention -> row, column -> row MLP, a gathered column and a
    row layer that shards its own input."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = QKVParallelLinear(8, num_heads=4)
        self.proj = RowParallelLinear(8, 8)
        self.up = ColumnParallelLinear(8, 16)
        self.down = RowParallelLinear(16, 8)
        self.wide = ColumnParallelLinear(8, 4, gather_output=True, bias=False)
        self.narrow = RowParallelLinear(4, 8, input_is_parallel=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x)
        attn = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        )
        x = x + self.proj(attn.transpose(1, 2).flatten(-2))
        x = x + self.down(F.gelu(self.up(x)))
        return x + self.narrow(self.wide(x).sin())


def build(seed: int, parallel: bool = True) -> Block:
    torch.manual_seed(seed)
    if parallel:
        return Block().double()
    with single_process():
        return Block().double()


def tp_chunk(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    dim = getattr(param, "tensor_parallel_dim", None)
    if dim is None:
        return full
    tp = ps.get_tp_group() if ps.model_parallel_is_initialized() else None
    n = 1 if tp is None else tp.world_size
    return full.chunk(n, dim)[0 if tp is None else tp.rank_in_group]


def linear_errors() -> dict[str, float]:
    """Output, input-gradient and per-parameter gradient errors against the reference."""
    ref, par = build(0, parallel=False), build(0)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 8, generator=gen, dtype=torch.float64)
    w = torch.randn(2, 5, 8, generator=gen, dtype=torch.float64)
    xr, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ref, out_par = ref(xr), par(xp)
    (out_ref * w).sum().backward()
    (out_par * w).sum().backward()
    errors = {
        "out": (out_par - out_ref).abs().max().item(),
        "input_grad": (xp.grad - xr.grad).abs().max().item(),
    }
    ref_params = dict(ref.named_parameters())
    for name, p in par.named_parameters():
        r = ref_params[name]
        errors[f"{name}.weight"] = (p - tp_chunk(r, p)).abs().max().item()
        errors[f"{name}.grad"] = (p.grad - tp_chunk(r.grad, p)).abs().max().item()
        assert r.grad.abs().max() > 0, name
    return errors


@pytest.mark.parametrize(
    ("size", "layout"),
    [
        (2, ParallelConfig(tp=2)),
        (4, ParallelConfig(tp=4)),
        (4, ParallelConfig(tp=2, sp=2)),
    ],
    ids=["tp2", "tp4", "tp2xsp2"],
)
def test_parallel_linears_match_single_device(worlds, size: int, layout: ParallelConfig) -> None:
    for errors in worlds(size).run(linear_errors, layout=layout):
        assert len(errors) == 2 + 2 * 11
        assert max(errors.values()) <= 1e-12, errors


def test_single_process_layers_are_plain_linears() -> None:
    """No layout: tp = 1, no communication, nn.Linear's math and init distribution."""
    errors = linear_errors()
    assert max(errors.values()) == 0.0
    layer = QKVParallelLinear(6, num_heads=2, head_dim=4)
    assert layer.weight.shape == (3, 8, 6) and layer.weight.tensor_parallel_dim == 1
    assert layer.bias.shape == (3, 8) and layer.bias.tensor_parallel_dim == 1
    x = torch.randn(3, 6)
    q, k, v = layer(x)
    for i, t in enumerate((q, k, v)):
        expect = F.linear(x, layer.weight[i], layer.bias[i]).view(3, 2, 4)
        assert torch.allclose(t, expect, atol=1e-6)
    assert layer.weight.abs().max() <= 1 / 6**0.5
    col, row = ColumnParallelLinear(6, 4), RowParallelLinear(4, 6)
    assert col.weight.tensor_parallel_dim == 0 and col.bias.tensor_parallel_dim == 0
    assert row.weight.tensor_parallel_dim == 1 and not hasattr(row.bias, "tensor_parallel_dim")


def test_shard_tags_survive_copies_and_conversions() -> None:
    """deepcopy (an EMA model), .to() and meta -> to_empty() make new Parameter objects;
    the tensor_parallel_dim tags must follow."""
    model = build(0)
    dims = {
        n: p.tensor_parallel_dim
        for n, p in model.named_parameters()
        if hasattr(p, "tensor_parallel_dim")
    }
    assert len(dims) == 8
    for other in (
        copy.deepcopy(model),
        copy.deepcopy(model).to("meta"),
        copy.deepcopy(model).to("meta").to_empty(device="cpu"),
        copy.deepcopy(model).float(),
    ):
        assert dims == {
            n: p.tensor_parallel_dim
            for n, p in other.named_parameters()
            if hasattr(p, "tensor_parallel_dim")
        }
    assert copy.deepcopy(model).qkv.tp_group is model.qkv.tp_group


def test_single_process_checkpoint_round_trip(tmp_path) -> None:
    model = build(0)
    state = full_state_dict(model)
    assert state.keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(state[key], value)
    path = tmp_path / "block.safetensors"
    save_full_weights(model, path)
    other = build(1)
    load_full_weights(other, path)
    assert all(
        torch.equal(a, b) for a, b in zip(other.state_dict().values(), state.values(), strict=True)
    )
    with pytest.raises(KeyError, match="missing"):
        load_full_state_dict(other, {k: v for k, v in state.items() if k != "up.bias"})
    missing, unexpected = load_full_state_dict(
        other, {**state, "extra": torch.ones(1)}, strict=False
    )
    assert (missing, unexpected) == ([], ["extra"])


def checkpoint_round_trip(path: str) -> dict[str, float]:
    """Load a single-device file into this layout, check the shards, gather it back."""
    full = load_file(path)
    model = build(seed=123)  # different weights before loading
    load_full_weights(model, path)
    tp = ps.get_tp_group()
    shards_ok = all(
        torch.equal(p, full[n].chunk(tp.world_size, p.tensor_parallel_dim)[tp.rank_in_group])
        for n, p in model.named_parameters()
        if hasattr(p, "tensor_parallel_dim")
    )
    gathered = full_state_dict(model)
    ref = build(0, parallel=False)
    load_full_state_dict(ref, full)
    x = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    return {
        "shards_ok": float(shards_ok),
        "keys_ok": float(gathered.keys() == full.keys()),
        "round_trip": max((gathered[k] - full[k]).abs().max().item() for k in full),
        "out": (model(x) - ref(x)).abs().max().item(),
    }


@pytest.mark.parametrize(
    ("size", "layout"), [(2, ParallelConfig(tp=2)), (4, ParallelConfig(tp=4))], ids=["tp2", "tp4"]
)
def test_single_device_checkpoint_loads_into_any_tp(
    worlds, tmp_path, size: int, layout: ParallelConfig
) -> None:
    """A checkpoint trained on one device (random weights here) loads at tp 2 and 4, and
    full_state_dict gives back exactly the same tensors."""
    torch.manual_seed(9)
    with single_process():
        trained = Block().double()
    with torch.no_grad():
        for p in trained.parameters():
            p.normal_()
    path = tmp_path / "trained.safetensors"
    save_file(full_state_dict(trained), str(path))
    for result in worlds(size).run(checkpoint_round_trip, str(path), layout=layout):
        assert result["shards_ok"] == 1.0 and result["keys_ok"] == 1.0
        assert result["round_trip"] == 0.0
        assert result["out"] <= 1e-12, result


def bad_sizes() -> list[str]:
    messages = []
    for make in (
        lambda: QKVParallelLinear(12, num_heads=1),
        lambda: ColumnParallelLinear(4, 5),
        lambda: RowParallelLinear(3, 4),
        lambda: ColumnParallelLinear(8, 6, split_unit=4),
        lambda: ColumnParallelLinear(4, 12, split_unit=4, gather_output=True),
        lambda: RowParallelLinear(12, 4, split_unit=4, input_is_parallel=False),
    ):
        try:
            make()
        except ValueError as e:
            messages.append(str(e))
    return messages


def test_sizes_tp_cannot_split_raise(worlds) -> None:
    for messages in worlds(2).run(bad_sizes, layout=ParallelConfig(tp=2)):
        assert [m.split(";")[0] for m in messages] == [
            "num_heads(1) has 1 heads, fewer than tp(2): every tp rank needs one",
            "out_features(5) is not divisible by tp(2)",
            "in_features(3) is not divisible by tp(2)",
            "out_features(6) is not whole units of split_unit(4)",
            "gather_output needs equal shards: out_features(12) split unevenly over tp(2)",
            "input_is_parallel=False needs equal shards: in_features(12) split unevenly over tp(2)",
        ]
