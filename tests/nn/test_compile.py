"""Regional compilation of VideoDiT: the compiled blocks equal the eager ones under tp,
Ulysses and Ring, each block one graph with its collectives in it (``fullgraph=True``), with
activation checkpointing, and every block shares one compiled graph."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch._dynamo.testing import EagerAndRecordGraphs

from test_dit import SIZES, inputs, randomize
from vidpar.config import ParallelConfig
from vidpar.distributed import telemetry
from vidpar.nn import DiTConfig, VideoDiT
from vidpar.nn.dit_blocks import DiTBlock
from vidpar.nn.regional_compile import block_runner, compile_options


def compiled_errors(
    backend: str, recompute: bool | str, dtype_name: str = "float64"
) -> dict[str, float]:
    """Relative errors of a compiled model's output and gradients against the eager model
    of the same layout and weights (this rank's shards); ``graph_breaks``: how many times
    dynamo broke a graph (it raises instead: every block compiles with ``fullgraph=True``)."""
    from torch._dynamo.utils import counters

    counters.clear()
    dtype = getattr(torch, dtype_name)
    config = DiTConfig(**SIZES)
    eager = VideoDiT(config).to(dtype)
    randomize(eager)
    options = {"backend": backend, "fullgraph": True}
    compiled = VideoDiT(
        dataclasses.replace(config, compile=options, activation_checkpointing=recompute)
    ).to(dtype)
    compiled.load_state_dict(eager.state_dict())
    x, t, c, w = inputs(3, 6, "class", dtype)
    # Telemetry records the same collectives for the compiled blocks as for eager ones
    # that recompute alike (a second pass: the first compiles).
    twin = VideoDiT(dataclasses.replace(config, activation_checkpointing=recompute)).to(dtype)
    twin.load_state_dict(eager.state_dict())
    collectives = {}
    for name, model in (("eager", twin), ("compiled", compiled)):
        for _ in range(2):
            recorder = telemetry.start_recording()
            (model(x, t, c) * w).sum().backward()
            telemetry.stop_recording()
        collectives[name] = [(r.group, r.op, r.nbytes) for r in recorder.records]
        model.zero_grad()
    out_eager, out_compiled = eager(x, t, c), compiled(x, t, c)
    (out_eager * w).sum().backward()
    (out_compiled * w).sum().backward()

    def rel(a, b):
        return ((a - b).abs().max() / b.abs().max()).item()

    grads = [
        rel(p.grad, q.grad) for p, q in zip(compiled.parameters(), eager.parameters(), strict=True)
    ]
    breaks = sum(counters["graph_break"].values())
    return {
        "out": rel(out_compiled, out_eager),
        "grad": max(grads),
        "graph_breaks": breaks,
        # The same collectives; a compiled backward may order them otherwise.
        "same_collectives": sorted(collectives["compiled"]) == sorted(collectives["eager"]),
        "collectives": len(collectives["eager"]),
    }


@pytest.mark.parametrize(
    ("layout", "recompute"),
    [
        pytest.param(ParallelConfig(tp=2), True, id="tp2-checkpointing"),
        pytest.param(ParallelConfig(sp=2), False, id="ulysses2"),
        pytest.param(ParallelConfig(ring=2), True, id="ring2-checkpointing"),
        pytest.param(ParallelConfig(sp=2), "keep_attention", id="ulysses2-keep-attention"),
        pytest.param(ParallelConfig(tp=2, sp=2), False, id="tp2-ulysses2"),
        pytest.param(ParallelConfig(sp=4, ring=2), True, id="ulysses2-ring2-checkpointing"),
    ],
)
def test_compiled_blocks_equal_eager(worlds, layout, recompute) -> None:
    """aot_eager traces what inductor compiles (the same graphs): every block one graph
    with its collectives (``fullgraph=True``, no break), float64 output and gradients to
    1e-10 on 27 tokens (padded over sp)."""
    run = worlds(layout.world_size).run
    for result in run(compiled_errors, "aot_eager", recompute, layout=layout, timeout=280):
        assert result["graph_breaks"] == 0, result
        assert result["same_collectives"] and result["collectives"] > 0, result
        assert result["out"] <= 1e-10 and result["grad"] <= 1e-10, result


def test_inductor_compiles_parallel_blocks_whole(worlds) -> None:
    """The real compiler (C++ kernels) with the ring's and the gathers' custom ops inside
    the graph (their fake kernels' shapes and strides are what inductor lays buffers out
    by): float32 output and gradients equal eager's, no graph break."""
    layout = ParallelConfig(ring=2)
    for result in worlds(2).run(
        compiled_errors, "inductor", False, "float32", layout=layout, timeout=280
    ):
        assert result["graph_breaks"] == 0, result
        assert result["out"] <= 1e-5 and result["grad"] <= 1e-4, result


@pytest.mark.parametrize(
    ("recompute", "traced"),
    [(False, False), (True, False), ("keep_attention", True)],
    ids=["inference", "checkpointing", "keep-attention"],
)
def test_blocks_share_one_graph(recompute, traced) -> None:
    """Four blocks, one trace: parameters are graph inputs, not constants. Full
    checkpointing wraps the compiled block; keep_attention's checkpoint is in the graph."""
    graphs = EagerAndRecordGraphs()
    run = block_runner({"backend": graphs}, recompute)
    config = DiTConfig(**SIZES)
    x = torch.randn(2, 12, config.hidden_size, requires_grad=bool(recompute))
    time = torch.randn(2, 6, config.hidden_size)
    context = torch.randn(2, 3, config.hidden_size)
    angles = torch.zeros(12, config.head_dim // 2)
    rope = (angles.cos().repeat_interleave(2, -1)[:, None], angles[:, None].repeat(1, 1, 2))
    with torch.set_grad_enabled(bool(recompute)):
        for _ in range(4):
            x = run(DiTBlock(config), x, time, context, rope, 12)
    assert len(graphs.graphs) == 1 and torch.isfinite(x).all()
    assert ("tag_activation_checkpoint" in graphs.graphs[0].code) == traced


def test_compile_settings() -> None:
    assert compile_options(False) is None
    assert compile_options(True) == {"dynamic": False}
    assert compile_options("aot_eager") == {"dynamic": False, "backend": "aot_eager"}
    assert compile_options({"dynamic": True, "mode": "max-autotune"})["dynamic"] is True
    with pytest.raises(TypeError, match="backend name"):
        compile_options(3)


@pytest.mark.slow
def test_inductor_compiles_the_model_on_cpu() -> None:
    """The real compiler (C++ kernels from gcc) in float32, forward and backward, one
    process."""
    result = compiled_errors("inductor", False, "float32")
    assert result["out"] <= 1e-5 and result["grad"] <= 1e-4, result
