"""vidpar.models.parallelize on the diffusers families beyond Wan and CogVideoX (one
parametrised test per family × layout): outputs and parameter gradients equal the
unparallelised diffusers model's in float64, with 27 video tokens (a multiple of neither
2 nor 4) and, where the family takes one, a text mask with padding."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from diffusers.models.normalization import FP32LayerNorm

from models_oracle import backward_both, gradient_errors, relative_error, worst
from vidpar.config import ParallelConfig
from vidpar.models import SUPPORTED_MODELS, parallelize
from vidpar.models import testing as tiny

TOLERANCE = 1e-9
#: Gradients diffusers itself rounds to float32 while they are partial sums over tokens
#: (FP32LayerNorm weights, Wan-like time embeddings): under sp they agree to float32.
FLOAT32_TOLERANCE = 1e-6
LAYOUTS = {
    "sp2": ParallelConfig(sp=2),
    "ring2": ParallelConfig(ring=2),
    "ulysses2_ring2": ParallelConfig(ulysses=2, ring=2),
    "tp2": ParallelConfig(tp=2),
    "tp2_sp2": ParallelConfig(tp=2, sp=2),
}
BATCH, TEXT = 2, 5


def _noise(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _text_mask() -> torch.Tensor:
    """The second prompt is 2 tokens shorter: its last 2 text tokens are padding."""
    mask = torch.ones(BATCH, TEXT)
    mask[1, -2:] = 0
    return mask


@dataclass(frozen=True)
class Family:
    make: Callable[..., torch.nn.Module]
    inputs: Callable[[], dict]
    #: Parameter name prefixes whose gradients diffusers rounds to float32.
    float32: tuple[str, ...] = ()


FAMILIES = {
    "skyreels_v2": Family(
        tiny.tiny_skyreels_v2,
        lambda: {
            "hidden_states": _noise(1, BATCH, 4, 3, 6, 6),
            "timestep": torch.tensor([100.0, 700.0], dtype=torch.float64),
            "encoder_hidden_states": _noise(2, BATCH, TEXT, 16),
        },
        ("condition_embedder.time_",),
    ),
    "ltx": Family(
        tiny.tiny_ltx,
        lambda: {
            "hidden_states": _noise(1, BATCH, 27, 8),
            "encoder_hidden_states": _noise(2, BATCH, TEXT, 16),
            "timestep": torch.tensor([100.0, 700.0], dtype=torch.float64),
            "encoder_attention_mask": _text_mask(),
            "num_frames": 3,
            "height": 3,
            "width": 3,
        },
    ),
}


def _matches_diffusers(family: str) -> dict[str, float]:
    reference = FAMILIES[family].make().double()
    model = parallelize(copy.deepcopy(reference))
    inputs = FAMILIES[family].inputs()
    expected = reference(**inputs, return_dict=False)[0]
    out = model(**inputs, return_dict=False)[0]
    backward_both(expected, out)
    return {"output": relative_error(out, expected), **gradient_errors(reference, model)}


def _float32_gradients(family: str) -> set[str]:
    model = FAMILIES[family].make()
    names = {n for n, _ in model.named_parameters() if n.startswith(FAMILIES[family].float32)}
    for prefix, module in model.named_modules():
        if isinstance(module, FP32LayerNorm):
            names |= {f"{prefix}.{n}" for n, _ in module.named_parameters()}
    return names


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_outputs_and_gradients_equal_diffusers(worlds, family, layout):
    config = LAYOUTS[layout]
    errors = worst(worlds(config.world_size).run(_matches_diffusers, family, layout=config))
    assert errors.pop("output") <= TOLERANCE
    loose = _float32_gradients(family) if config.sp > 1 else set()
    bad = {
        name: error
        for name, error in errors.items()
        if error > (FLOAT32_TOLERANCE if name in loose else TOLERANCE)
    }
    assert not bad, bad


def test_every_family_is_listed():
    for name in ("SkyReelsV2Transformer3DModel", "LTXVideoTransformer3DModel"):
        assert name in SUPPORTED_MODELS
