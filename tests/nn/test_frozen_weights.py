"""Frozen weights held in autocast's dtype: under bf16 autocast, a LoRA model whose frozen
linears and convolutions hold bf16 weights computes what the float32-held one does, bit
for bit (outputs and adapter gradients), for every plan family. (The LoRA Lightning
module under ``bf16-mixed``: ``tests/lightning/test_lora_training.py``.)"""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import WanTransformer3DModel
from torch import nn

from test_models_families import TRAINED_HERE
from vidpar.models import parallelize
from vidpar.models import testing as tiny
from vidpar.nn.frozen_weights import AUTOCAST_MATMUL_LAYERS, cast_frozen_weights_for_autocast
from vidpar.nn.lora_layers import LoraSettings, add_lora, lora_parameters

MAKERS = {
    "wan": (
        lambda: WanTransformer3DModel(**tiny.TINY_WAN),
        lambda: {
            "hidden_states": torch.randn(
                2, 16, 2, 4, 4, generator=torch.Generator().manual_seed(1)
            ),
            "timestep": torch.tensor([100.0, 700.0]),
            "encoder_hidden_states": torch.randn(
                2, 5, 32, generator=torch.Generator().manual_seed(2)
            ),
        },
    ),
    **{name: (family.make, family.inputs) for name, family in TRAINED_HERE.items()},
}


def _lora_model(family: str) -> nn.Module:
    make, _ = MAKERS[family]
    torch.manual_seed(0)
    model = parallelize(make().float())
    add_lora(model, LoraSettings(rank=2, alpha=4, targets=["to_q", "to_k", "to_v"]))
    gen = torch.Generator().manual_seed(3)
    for name, param in lora_parameters(model).items():
        if name.endswith("lora_B.weight"):
            param.data.normal_(generator=gen)  # every factor then has a gradient
    return model


def _step(model: nn.Module, inputs: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**inputs, return_dict=False)[0]
    out.float().square().mean().backward()
    grads = {n: p.grad for n, p in lora_parameters(model).items()}
    return out.detach(), grads


@pytest.mark.parametrize("family", sorted(MAKERS))
def test_bf16_held_frozen_weights_compute_what_float32_ones_do(family):
    model = _lora_model(family)
    held = copy.deepcopy(model)
    freed = cast_frozen_weights_for_autocast(held, torch.bfloat16)  # keeps the class's list
    keep = getattr(model, "_keep_in_fp32_modules", None) or ()

    cast = {
        name: module.weight.dtype
        for name, module in held.named_modules()
        if isinstance(module, AUTOCAST_MATMUL_LAYERS)
    }
    kept = {n for n in cast if set(n.split(".")) & set(keep)}
    assert {cast[n] for n in cast if n not in kept} == {torch.bfloat16}
    assert {cast[n] for n in kept} <= {torch.float32}
    assert {p.dtype for p in lora_parameters(held).values()} == {torch.float32}
    layers = [m for m in held.modules() if isinstance(m, AUTOCAST_MATMUL_LAYERS)]
    assert all(m.bias is None or m.bias.dtype == torch.float32 for m in layers)
    halved = sum(
        m.weight.numel() * 2 for n, m in held.named_modules() if n in cast and n not in kept
    )
    assert freed == halved > 0

    _, make_inputs = MAKERS[family]
    inputs = {
        k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
        for k, v in make_inputs().items()
    }
    out, grads = _step(model, inputs)
    held_out, held_grads = _step(held, inputs)
    assert torch.equal(held_out, out)
    assert grads.keys() == held_grads.keys() and all(g is not None for g in grads.values())
    assert all(torch.equal(held_grads[n], grads[n]) for n in grads)
