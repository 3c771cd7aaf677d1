"""The LoRA linear as one autograd function: its values and gradients are the textbook
formula's, and it allocates no more than a trainable plain linear (issue #31's memory);
LoRA on a plan's tp layers that split heads unevenly trains as one process does."""

from __future__ import annotations

import copy
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from models_oracle import gradient_errors, relative_error
from vidpar.config import ParallelConfig
from vidpar.distributed.full_weights import full_state_dict, load_full_weights
from vidpar.models import parallelize
from vidpar.models.testing import TINY_WAN
from vidpar.nn.lora_layers import LoraLinear, LoraSettings, add_lora, lora_parameters


class _PeakBytes(TorchDispatchMode):
    """The most bytes of new storage that ops under the mode held alive at once (the
    storages of ``existing`` tensors, and their views, not counted)."""

    def __init__(self, existing: list[torch.Tensor]) -> None:
        super().__init__()
        self.existing = [t.untyped_storage() for t in existing]  # alive while the mode is
        self.sizes: dict[int, int] = {s._cdata: 0 for s in self.existing}
        self.now = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                storage = leaf.untyped_storage()
                if storage._cdata not in self.sizes:
                    self.sizes[storage._cdata] = storage.nbytes()
                    self.now += storage.nbytes()
                    self.peak = max(self.peak, self.now)
                    weakref.finalize(storage, self._free, storage._cdata)
        return out

    def _free(self, key: int) -> None:
        self.now -= self.sizes.pop(key)


def _lora(base: nn.Linear, rank: int, dropout: float = 0.0) -> LoraLinear:
    layer = LoraLinear(base, rank, 0.75, dropout, torch.Generator().manual_seed(1))
    nn.init.normal_(layer.lora_B.weight, generator=torch.Generator().manual_seed(2))
    return layer


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dropout", [0.0, 0.4])
@pytest.mark.parametrize("train_base", [False, True])
def test_values_and_gradients_are_the_formulas(bias, dropout, train_base):
    layer = _lora(nn.Linear(6, 5, bias=bias).double(), 3, dropout)
    layer.weight.requires_grad_(train_base)
    if bias:
        layer.bias.requires_grad_(train_base)
    x = torch.randn(2, 4, 6, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(5)
    y = layer(x)
    torch.manual_seed(5)  # the same dropout mask
    dropped = F.dropout(x, dropout, training=True) if dropout else x
    a, b = layer.lora_A.weight, layer.lora_B.weight
    want = F.linear(x, layer.weight, layer.bias) + 0.75 * F.linear(F.linear(dropped, a), b)
    torch.testing.assert_close(y, want, rtol=1e-13, atol=1e-13)
    inputs = [x, a, b] + ([p for p in (layer.weight, layer.bias) if p is not None] * train_base)
    grad = torch.randn_like(y)
    got = torch.autograd.grad(y, inputs, grad)
    for g, w in zip(got, torch.autograd.grad(want, inputs, grad), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-13, atol=1e-13)


def test_autocast_runs_in_its_dtype_with_float32_factors():
    layer = _lora(nn.Linear(8, 4).requires_grad_(False), 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(torch.randn(3, 8))
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.lora_A.weight.grad.dtype == layer.lora_B.weight.grad.dtype == torch.float32
    assert layer.weight.grad is None  # the base stays frozen


def _step_peak(layer: nn.Module, x: torch.Tensor) -> int:
    x.grad = None
    with _PeakBytes([x, *layer.parameters()]) as mode:
        layer(x).sum().backward()
    return mode.peak


def test_a_lora_linear_allocates_what_a_trainable_linear_does():
    """A wide FFN-like linear: the LoRA step's peak (forward + backward, frozen base) stays
    within the [tokens, r] low-rank activations of a plain linear's whose weight trains;
    adding the update out of place, or the two input gradients, costs a whole output or
    input more."""
    tokens, width, hidden, rank = 512, 64, 384, 4
    torch.manual_seed(0)
    plain = nn.Linear(hidden, width)
    x = torch.randn(tokens, hidden, requires_grad=True)
    reference = _step_peak(plain, x)
    layer = _lora(nn.Linear(hidden, width), rank).requires_grad_(False)
    layer.lora_A.requires_grad_(True)
    layer.lora_B.requires_grad_(True)
    low_rank = 3 * tokens * rank * 4  # x Aᵀ, its gradient, and slack for the factors' grads
    assert _step_peak(layer, x) <= reference + low_rank


def _uneven_heads_lora_training(steps: int = 3) -> dict[str, float]:
    """``steps`` SGD steps of LoRA (rank 2, random B so that every factor has a gradient)
    on a tiny float64 Wan of 3 heads, under the layout and in one process: each step's
    loss, the last step's adapter gradients and the trained adapters, as relative errors."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    base = WanTransformer3DModel(**{**TINY_WAN, "num_attention_heads": 3}).double()
    settings = LoraSettings(rank=2, alpha=3)
    reference = copy.deepcopy(base)
    add_lora(reference, settings)
    gen = torch.Generator().manual_seed(3)
    for name, param in lora_parameters(reference).items():
        if name.endswith("lora_B.weight"):
            param.data.normal_(generator=gen)
    model = parallelize(copy.deepcopy(base))
    add_lora(model, settings)
    load_full_weights(model, reference.state_dict())
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(1, 16, 2, 4, 4, generator=gen, dtype=torch.float64)
    text = torch.randn(1, 5, 32, generator=gen, dtype=torch.float64)
    target = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    t = torch.tensor([400.0], dtype=torch.float64)
    errors: dict[str, float] = {}
    optimizers = [torch.optim.SGD(lora_parameters(m).values(), lr=0.5) for m in (reference, model)]
    for step in range(steps):
        losses = []
        for module, optimizer in zip((reference, model), optimizers, strict=True):
            optimizer.zero_grad()
            loss = F.mse_loss(module(x, t, text, return_dict=False)[0], target)
            loss.backward()
            losses.append(loss.detach())
        errors[f"loss{step}"] = relative_error(losses[1], losses[0])
        if step == steps - 1:
            errors.update(gradient_errors(reference, model))
        for optimizer in optimizers:
            optimizer.step()
    trained = full_state_dict(model)
    for name, param in lora_parameters(reference).items():
        errors[f"trained {name}"] = relative_error(trained[name], param)
    return errors


def test_lora_trains_as_one_process_with_three_heads_over_tp2(worlds):
    """The plan's tp layers (q/k/v/o, FFN, the RMSNorms across heads) split 3 heads 2 + 1,
    and each adapter follows its layer's uneven split: losses, gradients and trained
    adapters equal one process's (float64)."""
    for errors in worlds(2).run(_uneven_heads_lora_training, layout=ParallelConfig(tp=2)):
        assert len(errors) == 3 + 2 * 40  # losses; 2 blocks × 10 adapters × 2 factors, twice
        for name, error in errors.items():
            assert error <= 1e-9, (name, error)


def _feed_forward(fused: bool, dtype: torch.dtype, dropout: float = 0.0) -> nn.Module:
    """diffusers' Wan FFN (GELU tanh, Dropout(0), linear) with LoRA on both linears and a
    random B; ``fused=False`` puts the GELU module back where it was."""
    from diffusers.models.attention import FeedForward

    torch.manual_seed(0)
    ffn = FeedForward(16, inner_dim=96, activation_fn="gelu-approximate").to(dtype)
    gelu = ffn.net[0]
    add_lora(ffn, LoraSettings(rank=3, targets=("net.0.proj", "net.2"), dropout=dropout))
    gen = torch.Generator().manual_seed(1)
    for name, param in lora_parameters(ffn).items():
        if name.endswith("lora_B.weight"):
            param.data.copy_(torch.randn(param.shape, generator=gen))
    assert ffn.net[2].input_gelu == "tanh"
    if not fused:
        gelu.proj = ffn.net[0].proj
        ffn.net[0], ffn.net[2].input_gelu = gelu, None
    return ffn


def _saved_bytes(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``module(x)`` and the bytes of the distinct storages autograd saves for backward."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = module(x)
    return y, sum(storages.values())


@pytest.mark.parametrize(
    ("dtype", "device"),
    [
        (torch.bfloat16, "cpu"),
        (torch.float64, "cpu"),
        pytest.param(torch.bfloat16, "cuda", marks=pytest.mark.gpu),
    ],
)
def test_the_ffn_gelu_in_the_adapted_layer_is_bit_identical_and_saves_one_tensor(dtype, device):
    """Output, input gradient and every adapter gradient equal the separate GELU's bit for
    bit; what backward keeps shrinks by GELU's output, one [tokens, ffn_dim] tensor."""
    x = torch.randn(2, 40, 16, generator=torch.Generator().manual_seed(2)).to(device, dtype)
    results = []
    for fused in (True, False):
        ffn = _feed_forward(fused, dtype).to(device)
        xi = x.clone().requires_grad_(True)
        y, saved = _saved_bytes(ffn, xi)
        grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(device, dtype)
        y.backward(grad)
        grads = [p.grad for p in lora_parameters(ffn).values()]
        results.append((y, xi.grad, grads, saved))
    (y, gx, grads, saved), (y0, gx0, grads0, saved0) = results
    assert torch.equal(y, y0) and torch.equal(gx, gx0)
    assert all(torch.equal(g, g0) for g, g0 in zip(grads, grads0, strict=True))
    assert saved0 - saved == 2 * 40 * 96 * x.element_size()


def test_adapter_dropout_acts_on_the_gelu_output():
    """With the adapters' dropout the GELU runs before it, as in the separate module."""
    x = torch.randn(2, 40, 16, dtype=torch.float64)
    outputs = []
    for fused in (True, False):
        ffn = _feed_forward(fused, torch.float64, dropout=0.3)
        torch.manual_seed(4)
        outputs.append(ffn(x))
    assert torch.equal(*outputs)
