"""benchmarks/lora_vs_full.py's op count: FLOPs by ``FlopCounterMode``'s formulas (the
in-place ``addmm_`` and CPU flash attention included), bytes read and written per call,
nothing for views and allocations."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "lora_vs_full.py"


def _script():
    spec = importlib.util.spec_from_file_location("lora_vs_full", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_op_counts_of_matmuls_views_and_attention():
    counts = _script().OpCounts()
    a, b = torch.randn(8, 4), torch.randn(4, 6)
    y = torch.empty(8, 6)
    q = torch.randn(1, 2, 16, 8)
    with counts:
        torch.mm(a, b, out=y)  # reads a, b; writes y (the out= is not read)
        y.addmm_(a, b)  # reads y, a, b; writes y
        y.t()  # a view: moves nothing
        torch.empty(100)  # an allocation: moves nothing
        F.scaled_dot_product_attention(q, q, q)
    assert counts.flops["mm"] == counts.flops["addmm_"] == 2 * 8 * 4 * 6
    assert counts.bytes["mm"] == (32 + 24 + 48) * 4
    assert counts.bytes["addmm_"] == (48 + 32 + 24 + 48) * 4
    assert counts.calls["t"] == counts.calls["empty"] == 1
    assert counts.bytes["t"] == counts.bytes["empty"] == 0
    attention = [n for n in counts.flops if "attention" in n]
    assert attention and sum(counts.flops[n] for n in attention) == 2 * (2 * 2 * 16 * 16 * 8)
    assert counts.model_s > 0
