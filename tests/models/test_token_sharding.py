"""vidpar.models.token_sharding on its own: diffusers' ``_cp_plan`` grammar read into
splits and gathers (a tuple argument's items each with its own spec, ``*`` for every
module of a list) and applied by the hooks over sp2 with 5 tokens (padded to 6), the
result equal to the unsplit forward's."""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch
from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput
from torch import nn

from models_oracle import LAYOUTS
from vidpar.models.token_sharding import (
    SequenceLength,
    Split,
    TokenHooks,
    cp_plan_tokens,
)

TOKENS, WIDTH = 5, 3


class AddPair(nn.Module):
    def forward(self, x: torch.Tensor, pair: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        per_sample, shared = pair  # [B, S, D] and [S, D]: one token dim each, not the same
        return x * 2 + per_sample + shared


class PairModel(nn.Module):
    _cp_plan: ClassVar[dict] = {
        "blocks.0": {"x": ContextParallelInput(split_dim=1, expected_dims=3)},
        "blocks.*": {
            "pair": [
                ContextParallelInput(split_dim=1, expected_dims=3),
                ContextParallelInput(split_dim=0, expected_dims=2),
            ]
        },
        "out": ContextParallelOutput(gather_dim=1, expected_dims=3),
    }

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([AddPair(), AddPair()])
        self.out = nn.Identity()

    def forward(self, x: torch.Tensor, pair: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, pair)
        return self.out(x)


def _inputs() -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, TOKENS, WIDTH, generator=gen, dtype=torch.float64)
    pair = (
        torch.randn(2, TOKENS, WIDTH, generator=gen, dtype=torch.float64),
        torch.randn(TOKENS, WIDTH, generator=gen, dtype=torch.float64),
    )
    return x, pair


def test_a_cp_plan_reads_into_splits_and_gathers():
    tokens = cp_plan_tokens(PairModel(), whole=())
    assert tokens["blocks.*"]["pair"] == (Split(1, 3), Split(0, 2))
    assert tokens["blocks.0"] == {"x": Split(1, 3)} and tokens["out"].dim == 1


def _hooked_forward() -> tuple[float, bool, int]:
    from vidpar.distributed.state import get_parallel_state

    expected = PairModel()(*_inputs())
    model, length = PairModel(), SequenceLength()
    TokenHooks(model, cp_plan_tokens(model, whole=()), get_parallel_state().group("sp"), length)
    out = model(*_inputs())
    return float((out - expected).abs().max()), length.sharded, length.get()


def test_the_hooks_split_each_item_by_its_own_spec_over_sp2(worlds):
    for error, sharded, length in worlds(2).run(_hooked_forward, layout=LAYOUTS["sp2"]):
        assert error == 0.0 and length == TOKENS
        assert not sharded  # gathered at the output


def test_a_path_with_no_module_and_two_lengths_are_named():
    model = PairModel()
    with pytest.raises(
        ValueError, match=r"PairModel has no module at the token plan's 'layers\.\*'"
    ):
        TokenHooks(model, {"layers.*": {"x": Split(1)}}, None, SequenceLength())  # type: ignore[arg-type]
    length = SequenceLength()
    length.record(5)
    with pytest.raises(ValueError, match="sequences of 5 and 6 tokens"):
        length.record(6)
