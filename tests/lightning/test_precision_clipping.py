"""Lightning's precision plugins become their tp-clipping subclasses with the same settings
(32-true, 64-true, bf16-mixed, bf16-true); one Lightning has no subclass for is refused
by name. The tp case itself (clipping by the global norm over tp ranks) is
``test_lightning.py::test_gradient_clipping_sees_the_whole_gradient_under_tp``."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.plugins.precision import (
    DoublePrecision,
    HalfPrecision,
    MixedPrecision,
    Precision,
)

from vidpar.lightning.precision import TensorParallelClipping, with_tensor_parallel_clipping


@pytest.mark.parametrize(
    "plugin",
    [
        Precision(),
        DoublePrecision(),
        MixedPrecision("bf16-mixed", "cpu"),
        HalfPrecision("bf16-true"),
    ],
    ids=["32-true", "64-true", "bf16-mixed", "bf16-true"],
)
def test_each_precision_keeps_its_settings_and_clips_by_the_norm(plugin: Precision) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(5, 4)).square().sum().backward()
    expected = [p.grad.clone() for p in model.parameters()]
    norm = torch.nn.utils.clip_grad_norm_([_with(g) for g in expected], 0.05)
    assert norm > 1  # the clipping bites
    clipping = with_tensor_parallel_clipping(plugin, model)
    assert isinstance(clipping, type(plugin)) and isinstance(clipping, TensorParallelClipping)
    assert vars(plugin).items() <= vars(clipping).items()  # the same dtype, scaler, device
    clipping.clip_gradients(optimizer, 0.05)
    for param, want in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(param.grad, want)
    assert with_tensor_parallel_clipping(clipping, model) is clipping


def _with(grad: torch.Tensor) -> torch.Tensor:
    """A parameter holding ``grad`` as its gradient, so torch clips ``grad`` in place."""
    param = torch.nn.Parameter(torch.empty_like(grad))
    param.grad = grad
    return param


def test_a_precision_without_a_tp_subclass_is_refused_by_name() -> None:
    class CustomPrecision(Precision):
        pass

    with pytest.raises(ValueError, match="CustomPrecision cannot clip gradients over tp"):
        with_tensor_parallel_clipping(CustomPrecision(), torch.nn.Linear(2, 2))
