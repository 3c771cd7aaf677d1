"""vidpar.models.parallelize on diffusers' CogVideoXTransformer3DModel (joint attention:
the text tokens are queries too): outputs and parameter gradients equal the
unparallelised diffusers model's (float64) under every layout, with 27 video tokens."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import CogVideoXTransformer3DModel
from diffusers.models.embeddings import get_3d_rotary_pos_embed

from models_oracle import CFG_LAYOUT, LAYOUTS, compare_under_layout, relative_error, worst
from vidpar.config import ParallelConfig
from vidpar.models import parallelize

HEAD_DIM = 16
CONFIG = {
    "num_attention_heads": 4,
    "attention_head_dim": HEAD_DIM,
    "in_channels": 4,
    "out_channels": 4,
    "time_embed_dim": 16,
    "text_embed_dim": 16,
    "num_layers": 2,
    "sample_width": 6,
    "sample_height": 6,
    "sample_frames": 9,  # 3 latent frames
    "patch_size": 2,
    "max_text_seq_length": 5,
    "use_rotary_positional_embeddings": True,
}
TEXT = 5
GRID = (3, 3, 3)  # latent frames × (height, width) / patch: 27 video tokens
TOLERANCE = 1e-9

#: CogVideoX 1.0 5B (rotary embedding), 1.0 2B (sin-cos positions added to the tokens),
#: 1.5 (a temporal patch of 2, a linear patch embedding).
VARIANTS = {
    "rope": {},
    "sincos": {"use_rotary_positional_embeddings": False},
    "v1_5": {"patch_size_t": 2, "sample_frames": 21},
}


def tiny_cogvideox(**overrides) -> CogVideoXTransformer3DModel:
    torch.manual_seed(0)
    return CogVideoXTransformer3DModel(**{**CONFIG, **overrides}).double()


def cogvideox_inputs(model: CogVideoXTransformer3DModel, seed: int = 1) -> dict:
    gen = torch.Generator().manual_seed(seed)
    frames = GRID[0] * (model.config.patch_size_t or 1)
    latent = (2, frames, 4, 6, 6)
    inputs = {
        "hidden_states": torch.randn(latent, generator=gen, dtype=torch.float64),
        "encoder_hidden_states": torch.randn(2, TEXT, 16, generator=gen, dtype=torch.float64),
        "timestep": torch.tensor([100, 700]),
    }
    if model.config.use_rotary_positional_embeddings:
        cos, sin = get_3d_rotary_pos_embed(HEAD_DIM, ((0, 0), GRID[1:]), GRID[1:], GRID[0])
        inputs["image_rotary_emb"] = (cos.double(), sin.double())
    return inputs


def _matches_diffusers(variant: str) -> dict[str, float]:
    reference = tiny_cogvideox(**VARIANTS[variant])
    model = parallelize(copy.deepcopy(reference))
    return compare_under_layout(reference, model, cogvideox_inputs(reference))


@pytest.mark.parametrize(
    ("layout", "variant"),
    [(name, "rope") for name in LAYOUTS]
    + [("sp2", "sincos"), ("tp2_sp2", "v1_5"), ("cfg2_sp2", "v1_5")],
)
def test_outputs_and_gradients_equal_diffusers(worlds, layout, variant):
    """cfg2_sp2: each cfg rank runs one sample of the batch (a guidance branch)."""
    config = CFG_LAYOUT if layout == "cfg2_sp2" else LAYOUTS[layout]
    errors = worst(worlds(config.world_size).run(_matches_diffusers, variant, layout=config))
    assert max(errors.values()) <= TOLERANCE, {k: v for k, v in errors.items() if v > TOLERANCE}


def _padding_only_shard() -> float:
    """sp4 over 3 video tokens: the last rank holds padding only."""
    reference = tiny_cogvideox(use_rotary_positional_embeddings=False, sample_height=2)
    model = parallelize(copy.deepcopy(reference))
    inputs = cogvideox_inputs(reference)
    inputs["hidden_states"] = inputs["hidden_states"][..., :2, :2]  # 3 frames × 1 × 1
    return relative_error(
        model(**inputs, return_dict=False)[0], reference(**inputs, return_dict=False)[0]
    )


def test_a_rank_with_no_video_tokens(worlds):
    errors = worlds(4).run(_padding_only_shard, layout=ParallelConfig(sp=4))
    assert max(errors) <= TOLERANCE
