"""GPU memory of a benchmark step."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from vidpar.benchmarks.common import synchronize


def peak_bytes(model: Any, step: Callable[[], Any], device: torch.device) -> int | None:
    """The model's weights plus the peak of one ``step()`` above what was allocated before
    it (CUDA; ``None`` elsewhere). A first step allocates the gradients, as in training."""
    if device.type != "cuda":
        return None
    step()
    model.zero_grad(set_to_none=True)
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    synchronize(device)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    model.zero_grad(set_to_none=True)
    return torch.cuda.max_memory_allocated(device) - before + weights
