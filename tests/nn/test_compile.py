"""Regional compilation: inductor compiles the blocks of VideoDiT and of the parallelised
diffusers Wan under tp2, Ulysses 2, Ring 2, Ulysses 2 × Ring 2 and tp2 × Ulysses 2, each
block one graph with its collectives in it (``fullgraph=True``), with and without
activation checkpointing, equal to eager; every block shares one compiled graph. The other
parallelised diffusers families compile whole too, HunyuanVideo's and Mochi's text masks
included (a score bias instead of the eager path's per-sample slicing)."""

from __future__ import annotations

import copy
import dataclasses
import os

import pytest
import torch
from torch._dynamo.testing import EagerAndRecordGraphs

from models_oracle import LAYOUTS, backward_both, gradient_errors, relative_error, worst
from test_dit import SIZES, inputs, randomize
from test_models_wan import FLOAT32_TOLERANCE, compiled_matches_eager
from vidpar.config import ParallelConfig
from vidpar.distributed import state as parallel_state
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


#: The five layouts, each with the activation checkpointing VideoDiT's blocks compile
#: under there (full recomputation around the compiled block (``True``), none, and
#: ``keep_attention``, whose checkpoint is traced into the block) and the backend. Inductor
#: (C++ kernels, ≈ 50–80 s a layout on 2 cores) lowers every kind of collective in two
#: layouts: tp2 × Ulysses 2 (tp's functional collectives, the Ulysses all-to-all custom
#: ops) and Ring 2 (the ring's custom ops and the gathers); tp2, Ulysses 2 and
#: Ulysses 2 × Ring 2 issue only those same ops and run ``aot_eager``, which traces the
#: same forward and backward graphs without the C++ build (the suite's time).
#: ``VIDPAR_TEST_COMPILE_BACKEND=inductor`` runs all five under inductor (≈ 4–6 min more).
_LIGHT_BACKEND = os.environ.get("VIDPAR_TEST_COMPILE_BACKEND", "aot_eager")
COMPILED_LAYOUTS = {
    "tp2": (True, _LIGHT_BACKEND),
    "sp2": ("keep_attention", _LIGHT_BACKEND),
    "ring2": (False, "inductor"),
    "ulysses2_ring2": (True, _LIGHT_BACKEND),
    "tp2_sp2": (False, "inductor"),
}


def _compiled_blocks(recompute: bool | str, backend: str) -> dict[str, dict]:
    """VideoDiT's blocks and the parallelised tiny diffusers Wan's, compiled in float64 by
    ``backend``, in one call: one world's compile for both models."""
    dit = compiled_errors(backend, recompute)
    return {"dit": dit, "wan": compiled_matches_eager(backend)}


@pytest.mark.timeout(900)  # inductor's C++ compiles: minutes on a busy 2-core machine
@pytest.mark.parametrize("name", COMPILED_LAYOUTS)
def test_compiled_blocks_are_whole_under_every_layout(worlds, name) -> None:
    """Under tp2, Ulysses 2, Ring 2, Ulysses 2 × Ring 2 and tp2 × Ulysses 2, every block
    of VideoDiT and of diffusers' Wan compiles as one graph with its collectives
    (``fullgraph=True``, zero graph breaks in dynamo's counters), and their float64
    outputs and gradients equal eager's: VideoDiT's to 1e-10 against the same layout
    eager, with the same collectives in telemetry; Wan's to diffusers' own model to 1e-6:
    diffusers computes Wan's time embedding and ``norm2`` in float32, and inductor's
    fused float32 reductions add in another order than eager's kernels (4e-8 measured on
    the output; the same model eager under a layout: 1e-9). 27 tokens each, padded over
    sp. inductor's on-disk cache is the session's (tests/conftest.py): the ranks of a
    layout build each C++ kernel once."""
    layout = LAYOUTS[name]
    runs = worlds(layout.world_size).run(
        _compiled_blocks, *COMPILED_LAYOUTS[name], layout=layout, timeout=840
    )
    for run in runs:
        dit, wan = run["dit"], run["wan"]
        assert dit["graph_breaks"] == 0 and wan.pop("graph_breaks") == 0, run
        assert dit["same_collectives"] and dit["collectives"] > 0, dit
        assert dit["out"] <= 1e-10 and dit["grad"] <= 1e-10, dit
    wan = worst([run["wan"] for run in runs])
    assert max(wan.values()) <= FLOAT32_TOLERANCE, wan


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


def _family(name: str):
    """``(model, inputs, float32 gradients)`` of a tiny family (float64): those of
    tests/models/test_models_families.py, and CogVideoX."""
    if name == "cogvideox":
        import test_models_cogvideox as cogvideox

        model = cogvideox.tiny_cogvideox()
        return model, cogvideox.cogvideox_inputs(model), set()
    import test_models_families as families

    return (
        families.FAMILIES[name].make().double(),
        families.FAMILIES[name].inputs(),
        (families._float32_gradients(name)),
    )


def _compiled_family(name: str, backend: str) -> dict:
    """The family's blocks compiled (``fullgraph=True``) against diffusers' model and
    against the same layout eager (outputs; gradients)."""
    from torch._dynamo.utils import counters

    from vidpar.models import PLANS, parallelize

    torch._dynamo.reset()
    counters.clear()
    reference, kwargs, float32 = _family(name)
    eager = parallelize(copy.deepcopy(reference))
    options = {"backend": backend, "fullgraph": True}  # a graph break raises
    compiled = parallelize(copy.deepcopy(reference), compile=options)
    outs = [m(**kwargs, return_dict=False)[0] for m in (reference, eager, compiled)]
    backward_both(outs[0], outs[2])
    recorder = telemetry.start_recording()
    with torch.no_grad():
        compiled(**kwargs, return_dict=False)
    telemetry.stop_recording()
    for param, ref in zip(compiled.parameters(), reference.parameters(), strict=True):
        if ref.grad is None and param.grad is not None and not param.grad.any():
            param.grad = None  # a compiled block's unused output: zeros, not None
    grads = gradient_errors(reference, compiled)
    blocks = PLANS[type(reference).__name__].blocks
    return {
        "output": relative_error(outs[2], outs[0]),
        "eager": relative_error(outs[2], outs[1]),
        "grad": max(grads.values()),
        "grad_exact": max((e for n, e in grads.items() if n not in float32), default=0.0),
        "graph_breaks": sum(counters["graph_break"].values()),
        "ulysses_all_to_alls": sum(
            r.group == "ulysses" and r.op == "all_to_all" for r in recorder.records
        ),
        "graphs": counters["stats"]["unique_graphs"],
        "block_classes": len({type(m).__name__ for m in compiled.modules()} & set(blocks)),
    }


#: Every plan family with a masked or joint text, and LTX, compiled under a layout that
#: takes its attention's paths (the local masked SDPA, the masked ring block, the
#: replicated text queries' custom op): ``(layout, backend)``. Dynamo alone (``eager``)
#: checks the whole graph; ``aot_eager`` also traces the backward through the custom ops'
#: registered autograd (the ring's and the text queries'). One layout each, worlds of two
#: where that covers the path, for the suite's time (a HunyuanVideo layout costs about a
#: minute on the 2-core VM; all three of sp2, tp2_sp2 and ulysses2_ring2 pass).
COMPILED_FAMILIES = {
    "hunyuan_video": ("ring2", "eager"),
    "hunyuan_video_15": ("tp2_sp2", "eager"),
    "mochi": ("sp2", "eager"),
    "cogvideox": ("ulysses2_ring2", "aot_eager"),
    "ltx": ("tp2_sp2", "eager"),
}


@pytest.mark.parametrize("family", COMPILED_FAMILIES)
def test_plan_families_compile_whole_and_exact(worlds, family):
    """Each block one graph (``fullgraph=True``, zero breaks) with its collectives and the
    text mask, float64 output equal to diffusers' and to the eager layout to 1e-9,
    gradients to 1e-9 (1e-6 where diffusers rounds them to float32). Each tiny model runs
    its video self-attention twice (two blocks): under Ulysses a batch with a padded
    prompt is one all-to-all for q, k and v and one back per attention (eager: per
    sample)."""
    name, backend = COMPILED_FAMILIES[family]
    layout = LAYOUTS[name]
    runs = worlds(layout.world_size).run(
        _compiled_family, family, backend, layout=layout, timeout=600
    )
    for result in runs:
        assert result["graph_breaks"] == 0, result
        assert result["graphs"] >= result["block_classes"] > 0, result
        assert result["output"] <= 1e-9 and result["eager"] <= 1e-9, result
        assert result["grad_exact"] <= 1e-9 and result["grad"] <= 1e-6, result
        assert result["ulysses_all_to_alls"] == (2 * 2 if layout.ulysses > 1 else 0), result


def _masked_joint_errors() -> list[float]:
    """DistributedAttention and replicated_query_attention with a joint key mask (the
    compiled path, run eager) against the same calls on each sample's real joint keys
    only (the eager path): outputs and gradients."""
    from vidpar.models.sequence import replicated_query_attention
    from vidpar.nn import DistributedAttention

    sp = parallel_state.get_sp_group()
    gen = torch.Generator().manual_seed(5)
    video = [torch.randn(2, 3, 2, 8, generator=gen, dtype=torch.float64) for _ in range(3)]
    text = [torch.randn(2, 4, 2, 8, generator=gen, dtype=torch.float64) for _ in range(3)]
    mask = torch.tensor([[True] * 4, [True, True, False, False]])
    seq_len = 3 * sp.world_size - 1  # a padded video token on the last rank
    attention = DistributedAttention(2)

    def run(video, text, mask=None):
        leaves = [t.clone().requires_grad_() for t in (*video, *text)]
        q, k, v, q_text, k_text, v_text = leaves
        out = attention(q, k, v, seq_len=seq_len, joint_k=k_text, joint_v=v_text, joint_mask=mask)
        text_out = replicated_query_attention(
            q_text, k, v, sp, seq_len, k_text, v_text, extra_mask=mask
        )
        (out.square().sum() + text_out.pow(3).sum()).backward()
        return [out, text_out, *(t.grad for t in leaves)]

    masked = run(video, text, mask)
    per_sample = [
        run(
            [t[b : b + 1] for t in video],
            [text[0][b : b + 1]] + [t[b : b + 1, :n] for t in text[1:]],
        )
        for b, n in enumerate((4, 2))
    ]
    errors = []
    for i, got in enumerate(masked):
        parts = [p[i] for p in per_sample]
        if i >= 6:  # k_text, v_text: the padded keys get no gradient
            parts = [torch.nn.functional.pad(p, (0, 0, 0, 0, 0, 4 - p.shape[1])) for p in parts]
        errors.append(relative_error(got, torch.cat(parts)))
    return errors


@pytest.mark.parametrize(
    "layout",
    [None, ParallelConfig(sp=2), ParallelConfig(ring=2)],
    ids=["one-process", "ulysses2", "ring2"],
)
def test_a_joint_key_mask_equals_the_real_keys_alone(worlds, layout):
    runs = (
        [_masked_joint_errors()]
        if layout is None
        else worlds(2).run(_masked_joint_errors, layout=layout)
    )
    for errors in runs:
        assert max(errors) <= 1e-12, errors


@pytest.mark.parametrize("backend", ["cudnn", "efficient"])
def test_cuda_backends_take_a_key_bias_on_meta_tensors(backend):
    """The running torch's cuDNN and memory-efficient kernels accept the key bias (forward
    and backward, called as on a GPU but on meta tensors); flash takes none."""
    from vidpar.nn import attention_kernels as kernels

    q = torch.empty(2, 3, 100, 64, dtype=torch.bfloat16, device="meta")
    k = torch.empty(2, 3, 70, 64, dtype=torch.bfloat16, device="meta")
    bias = kernels.key_bias(torch.ones(2, 70, dtype=torch.bool, device="meta"), q.dtype)
    out, lse = kernels._FORWARD[backend](q, k, k, 0.125, bias)
    assert out.shape == q.shape and lse.shape == (2, 3, 100)
    grads = kernels._BACKWARD[backend](out, q, k, k, out, lse, 0.125, bias)
    assert [g.shape for g in grads] == [q.shape, k.shape, k.shape]
    with pytest.raises(RuntimeError, match="takes no"):
        kernels._FORWARD["flash"](q, k, k, 0.125, bias)
