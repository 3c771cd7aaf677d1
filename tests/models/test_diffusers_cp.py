"""vidpar.models.diffusers_cp on a class whose diffusers ``_cp_plan`` uses the whole grammar:
MiniMax-H3 (joint video + audio) splits at ``transformer_blocks.0``, splits an input of
every block through the wildcard ``transformer_blocks.*``, splits the two outputs of
``rope`` by tuple index (``split_output``), a 1-D input of ``norm_out``, and gathers at two
heads. Its packed sequence of 27 rows (text, video and audio interleaved; a multiple of
neither 2 nor 4) runs through diffusers' own processors, and its text refiner's attention
(whole text, before the split) stays diffusers' own. Outputs and parameter gradients equal
the unparallelised model's in float64; so do Helios's (nested wildcard paths
``blocks.*.attn1``, a gather after every attention and FFN)."""

from __future__ import annotations

import copy
from typing import ClassVar

import pytest
import torch

from models_oracle import LAYOUTS, backward_both, gradient_errors, relative_error, worst
from vidpar.models import parallelize

TOLERANCE = 1e-9
TINY_MINIMAX_H3 = {
    "num_attention_heads": 2,
    "attention_head_dim": 16,
    "hidden_size": 32,
    "num_layers": 2,
    "num_refiner_layers": 1,
    "ffn_dim": 64,
    "in_channels": 4,
    "audio_in_channels": 8,
    "text_dim": 16,
    "freq_dim": 32,
    "time_embed_hidden_dim": 32,
    "time_embed_dim": 16,
    "rope_freq_dim": 2,  # 2 × 3 × 2 of the 16 channels of a head rotate
}
BATCH, TEXT, VIDEO, AUDIO = 2, 5, 18, 4
ROWS = TEXT + VIDEO + AUDIO  # 27


def tiny_minimax_h3(seed: int = 0) -> torch.nn.Module:
    from diffusers import MiniMaxH3Transformer3DModel

    torch.manual_seed(seed)
    return MiniMaxH3Transformer3DModel(**TINY_MINIMAX_H3).double()


def minimax_h3_inputs() -> dict:
    """Text, video and audio rows interleaved in one packed sequence; the video at one
    noise level, the text and audio at another."""
    gen = torch.Generator().manual_seed(1)
    order = torch.randperm(ROWS, generator=gen)
    text, video, audio = order[:TEXT], order[TEXT : TEXT + VIDEO], order[TEXT + VIDEO :]
    tags = torch.zeros(ROWS, dtype=torch.long)
    tags[text], tags[audio] = 1, 2
    timestep_indices = (tags != 0).long()
    return {
        "hidden_states": torch.randn(BATCH, VIDEO, 16, generator=gen, dtype=torch.float64),
        "audio_hidden_states": torch.randn(BATCH, AUDIO, 8, generator=gen, dtype=torch.float64),
        "encoder_hidden_states": torch.randn(BATCH, TEXT, 16, generator=gen, dtype=torch.float64),
        "timestep": torch.tensor([0.3, 0.8], dtype=torch.float64),
        "timestep_indices": timestep_indices,
        "token_tags": tags,
        "position_ids": torch.randint(0, 6, (ROWS, 3), generator=gen),
        "video_indices": video,
        "audio_indices": audio,
        "text_indices": text,
    }


def _matches_diffusers(checkpointed: bool) -> dict[str, float]:
    reference = tiny_minimax_h3()
    model = parallelize(copy.deepcopy(reference))
    if checkpointed:  # the blocks and the text refiner recompute in the backward
        reference.enable_gradient_checkpointing()
        model.enable_gradient_checkpointing()
    inputs = minimax_h3_inputs()
    expected = reference(**inputs, return_dict=False)
    out = model(**inputs, return_dict=False)
    gen = torch.Generator().manual_seed(7)
    cotangents = [torch.randn(e.shape, generator=gen, dtype=e.dtype) for e in expected]
    sum((e * c).sum() for e, c in zip(expected, cotangents, strict=True)).backward()
    sum((o * c).sum() for o, c in zip(out, cotangents, strict=True)).backward()
    return {
        "video": relative_error(out[0], expected[0]),
        "audio": relative_error(out[1], expected[1]),
        **gradient_errors(reference, model),
    }


@pytest.mark.parametrize(
    ("layout", "checkpointed"), [("sp2", False), ("ring2", False), ("sp2", True)]
)
def test_a_cp_plan_with_wildcards_and_tuple_outputs_runs_sequence_parallel(
    worlds, layout, checkpointed
):
    """Checkpointed: diffusers' gradient checkpointing recomputes the blocks after the
    tokens were gathered, and the refiner after they were split: each attention keeps the
    path it took in the forward."""
    config = LAYOUTS[layout]
    errors = worst(worlds(config.world_size).run(_matches_diffusers, checkpointed, layout=config))
    bad = {name: error for name, error in errors.items() if error > TOLERANCE}
    assert not bad, bad


#: Helios names its 40 published blocks one by one in its _cp_plan: a tiny one keeps 40.
TINY_HELIOS = {
    "num_attention_heads": 2,
    "attention_head_dim": 8,
    "in_channels": 4,
    "out_channels": 4,
    "text_dim": 16,
    "freq_dim": 32,
    "ffn_dim": 32,
    "num_layers": 40,
    "rope_dim": (4, 2, 2),
    "has_multi_term_memory_patch": False,
}


def _helios_matches_diffusers() -> dict[str, float]:
    from diffusers import HeliosTransformer3DModel

    torch.manual_seed(0)
    reference = HeliosTransformer3DModel(**TINY_HELIOS).double()
    model = parallelize(copy.deepcopy(reference))
    gen = torch.Generator().manual_seed(1)
    inputs = {
        "hidden_states": torch.randn(2, 4, 3, 6, 6, generator=gen, dtype=torch.float64),
        "timestep": torch.tensor([100.0, 700.0], dtype=torch.float64),
        "encoder_hidden_states": torch.randn(2, 5, 16, generator=gen, dtype=torch.float64),
    }
    expected = reference(**inputs, return_dict=False)[0]
    out = model(**inputs, return_dict=False)[0]
    backward_both(expected, out)
    return {"output": relative_error(out, expected), **gradient_errors(reference, model)}


def test_a_cp_plan_that_splits_and_gathers_in_every_block_runs_sequence_parallel(worlds):
    """Helios splits at ``blocks.*.attn1``, ``blocks.*.attn2`` and ``blocks.*.ffn`` and
    gathers after each (27 tokens, ulysses 2 × ring 2): the layers between run whole on
    every rank, and their gradients are shares that the sum over sp makes whole (the
    output's gradient divided by sp, each gather's summed), as one process's."""
    from test_models_families import FLOAT32_TOLERANCE

    layout = LAYOUTS["ulysses2_ring2"]
    errors = worst(worlds(4).run(_helios_matches_diffusers, layout=layout))
    assert errors.pop("output") <= TOLERANCE
    #: Helios normalises and modulates in float32 (``.float()``), even in a float64 model:
    #: every gradient is a sum over tokens of float32-rounded terms, in another order.
    bad = {n: e for n, e in errors.items() if e > FLOAT32_TOLERANCE}
    assert not bad, bad


def _rope_split_per_item_matches_diffusers() -> dict[str, float]:
    """ChronoEdit with a plan of diffusers' grammar that splits the rotary embedding where
    every block takes it, item by item (a tuple of specs for the ``(cos, sin)`` argument,
    under the wildcard ``blocks.*``), instead of at the rope's output."""
    from diffusers import ChronoEditTransformer3DModel
    from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

    from test_models_families import CHRONOEDIT

    rope = ContextParallelInput(split_dim=1, expected_dims=4)

    class RopeSplitInEveryBlock(ChronoEditTransformer3DModel):
        _cp_plan: ClassVar[dict] = {
            "blocks.0": {"hidden_states": ContextParallelInput(split_dim=1, expected_dims=3)},
            "blocks.*": {"rotary_emb": (rope, rope)},
            "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3),
        }

    torch.manual_seed(0)
    reference = RopeSplitInEveryBlock(**CHRONOEDIT.make().config).double()
    model = parallelize(copy.deepcopy(reference))
    inputs = CHRONOEDIT.inputs()
    expected = reference(**inputs, return_dict=False)[0]
    out = model(**inputs, return_dict=False)[0]
    gen = torch.Generator().manual_seed(7)
    cotangent = torch.randn(expected.shape, generator=gen, dtype=expected.dtype)
    (expected * cotangent).sum().backward()
    (out * cotangent).sum().backward()
    return {"output": relative_error(out, expected), **gradient_errors(reference, model)}


def test_a_tuple_argument_splits_item_by_item_in_every_block(worlds):
    from test_models_families import FLOAT32_TOLERANCE

    config = LAYOUTS["sp2"]
    errors = worst(worlds(2).run(_rope_split_per_item_matches_diffusers, layout=config))
    assert errors.pop("output") <= TOLERANCE
    #: diffusers rounds these to float32 (the time embedding, the FP32LayerNorms).
    loose = {n for n in errors if n.startswith("condition_embedder.time_") or ".norm2." in n}
    bad = {n: e for n, e in errors.items() if e > (FLOAT32_TOLERANCE if n in loose else TOLERANCE)}
    assert not bad, bad
