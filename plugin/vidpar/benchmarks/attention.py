"""``attention``: one self-attention layer with its sequence sharded over sp (Ulysses,
Ring, USP) against the same layer in one process, in the same run.

The layer is vidpar's :class:`~vidpar.nn.DistributedAttention` between a fused QKV
projection and an output projection (``layer=projections``), or the attention alone on
given q, k, v (``layer=core``). The one-process reference runs on rank 0 of the same
workers (one device, or on CPU one worker's share of the cores) while the others wait,
interleaved with the parallel iterations so that both see the same load. A parallel
iteration's time is its slowest rank's. The output of every mode is checked against the
reference (``max_abs_diff``).

The ``kernels`` rows (:mod:`vidpar.benchmarks.ring_kernels`) time one ring rank's kernel
work on one device against one SDPA, for the ring sizes in ``kernels``; they need no
world, so ``modes=[]`` runs them alone (e.g. on one GPU).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from vidpar.benchmarks.common import (
    Common,
    check_choices,
    check_world,
    interleaved_runs,
    speedup_table,
    summarise_speedup,
    torch_dtype,
    use_layout,
)

#: The modes; every one shards the sequence over the whole world (sp = world).
MODES = ("ulysses", "ring", "usp")
PASSES = ("forward", "backward")
# Wan2.1-1.3B self-attention at 480p × 81 frames; a CPU size that runs in seconds.
GPU_SIZE = {"heads": 12, "head_dim": 128, "tokens": 32760, "dtype": "bfloat16"}
CPU_SIZE = {"heads": 8, "head_dim": 64, "tokens": 1024, "dtype": "float32"}


def layout(mode: str, world: int) -> dict[str, int]:
    """Ulysses and ring degrees of ``mode`` over ``world`` ranks (usp: Ulysses 2 inside,
    ring over the rest)."""
    if mode == "ulysses":
        return {"ulysses": world, "ring": 1}
    if mode == "ring":
        return {"ulysses": 1, "ring": world}
    if mode == "usp":
        if world < 4 or world % 2:
            raise ValueError(f"mode usp needs an even world of at least 4, got {world}")
        return {"ulysses": 2, "ring": world // 2}
    raise ValueError(f"unknown attention mode {mode!r}; choose from {list(MODES)}")


@dataclass
class AttentionOptions:
    """Sizes left ``None`` take :data:`GPU_SIZE` on CUDA and :data:`CPU_SIZE` on CPU.
    Every mode shards the sequence over all ``world`` ranks; ``modes`` default to
    ulysses and ring (and usp from world 4), ``[]`` runs none. ``kernels``: ring sizes of
    the kernel rows (``[]``: none); ``kernels_before``: include the pre-#16 matmul ring."""

    world: int = 2
    modes: list[str] | None = None
    kernels: list[int] = field(default_factory=lambda: [2, 4])
    kernels_before: bool = True
    layer: str = "projections"
    passes: list[str] = field(default_factory=lambda: list(PASSES))
    batch: int = 1
    heads: int | None = None
    head_dim: int | None = None
    tokens: int | None = None
    dtype: str | None = None


def resolved(options: AttentionOptions, common: Common) -> dict[str, Any]:
    """The sizes and modes this run uses."""
    defaults = GPU_SIZE if common.cuda else CPU_SIZE
    size = {k: getattr(options, k) or v for k, v in defaults.items()}
    modes = options.modes
    if modes is None:
        modes = ["ulysses", "ring", "usp"] if options.world >= 4 else ["ulysses", "ring"]
    if modes:
        check_world("attention", options.world)
    if any(r < 2 for r in options.kernels):
        raise ValueError(f"attention.kernels are ring sizes of at least 2, got {options.kernels}")
    for mode in modes:
        uly = layout(mode, options.world)["ulysses"]
        if size["heads"] % uly:
            raise ValueError(
                f"heads({size['heads']}) is not divisible by ulysses({uly}) in mode {mode}; "
                "use ring or usp"
            )
    check_choices("pass", options.passes, PASSES)
    if options.layer not in ("projections", "core"):
        raise ValueError(f"attention.layer must be projections or core, got {options.layer!r}")
    return {**size, "modes": modes, "batch": options.batch, "layer": options.layer}


class AttentionLayer(nn.Module):
    """QKV projection -> DistributedAttention -> output projection (groups from the
    current layout, or none inside :func:`vidpar.distributed.single_process`)."""

    def __init__(self, heads: int, head_dim: int) -> None:
        super().__init__()
        from vidpar.nn import DistributedAttention, QKVParallelLinear, RowParallelLinear

        hidden = heads * head_dim
        self.qkv = QKVParallelLinear(hidden, heads)
        self.attn = DistributedAttention(heads)
        self.proj = RowParallelLinear(hidden, hidden)

    def forward(self, x: torch.Tensor, seq_len: int) -> torch.Tensor:
        q, k, v = self.qkv(x)
        return self.proj(self.attn(q, k, v, seq_len=seq_len).flatten(-2))


def _inputs(size: dict[str, Any], device: torch.device, dtype: torch.dtype) -> list[torch.Tensor]:
    """Full-sequence inputs, the same on every rank: ``x`` or ``(q, k, v)``."""
    gen = torch.Generator().manual_seed(1234)
    b, s, h, d = size["batch"], size["tokens"], size["heads"], size["head_dim"]
    shapes = [(b, s, h * d)] if size["layer"] == "projections" else [(b, s, h, d)] * 3
    return [torch.randn(shape, generator=gen).to(device=device, dtype=dtype) for shape in shapes]


def _step(
    layer: nn.Module, inputs: list[torch.Tensor], seq_len: int, backward: bool
) -> torch.Tensor:
    """One forward (and backward with a fixed upstream gradient of ones)."""
    with torch.set_grad_enabled(backward):
        out = layer(*(t.detach().requires_grad_(backward) for t in inputs), seq_len=seq_len)
        if backward:
            out.backward(torch.ones_like(out))
    return out


def _measure_mode(worker, size: dict[str, Any], mode: str, common: Common) -> dict[str, Any]:
    """In each worker: interleaved one-process and parallel iterations of one mode."""
    from vidpar.distributed import single_process
    from vidpar.distributed import state as ps
    from vidpar.distributed.communication_op import gather_sequence, shard_sequence
    from vidpar.nn import DistributedAttention

    use_layout(**layout(mode, worker.world_size))
    device, dtype = worker.device, torch_dtype(size["dtype"])
    sp, world = ps.get_sp_group(), ps.get_world_group()
    seq_len = size["tokens"]
    full = _inputs(size, device, dtype)
    local = [shard_sequence(t, sp, dim=1) for t in full]

    def build() -> nn.Module:
        torch.manual_seed(0)
        if size["layer"] == "core":
            return _Core(DistributedAttention(size["heads"]))
        return AttentionLayer(size["heads"], size["head_dim"]).to(device=device, dtype=dtype)

    with single_process():
        reference = build() if world.rank_in_group == 0 else None
    parallel = build()

    out: dict[str, Any] = {"mode": mode}
    for pass_name in size["passes"]:
        backward = pass_name == "backward"

        def single_fn(backward: bool = backward) -> None:
            reference.zero_grad(set_to_none=True)
            _step(reference, full, seq_len, backward)

        def parallel_fn(backward: bool = backward) -> None:
            parallel.zero_grad(set_to_none=True)
            _step(parallel, local, seq_len, backward)

        out[pass_name] = interleaved_runs(
            single_fn if reference is not None else None, parallel_fn, world, device, common
        )

    # Correctness: the gathered parallel output against the one-process output.
    with torch.no_grad():
        got = gather_sequence(_step(parallel, local, seq_len, False), sp, seq_len, dim=1)
        if reference is not None:
            expect = _step(reference, full, seq_len, False)
            out["max_abs_diff"] = float((got.float() - expect.float()).abs().max())
            out["max_abs_ref"] = float(expect.float().abs().max())
    return out


class _Core(nn.Module):
    """DistributedAttention on given q, k, v (``layer=core``)."""

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.attn = attn

    def forward(self, q, k, v, seq_len: int) -> torch.Tensor:
        return self.attn(q, k, v, seq_len=seq_len)


def run(options: AttentionOptions, common: Common) -> dict[str, Any]:
    """Every mode of ``options`` in one world, each against the one-process layer."""
    from vidpar.benchmarks import ring_kernels
    from vidpar.config import ParallelConfig
    from vidpar.executor import Executor

    size = resolved(options, common)
    size["passes"] = list(options.passes)
    results = []
    if size["modes"]:
        with Executor(ParallelConfig(dp=options.world), devices=common.device) as ex:
            for mode in size["modes"]:
                per_rank = ex.collective_rpc(_measure_mode, size, mode, common)
                row = {"mode": mode, "world": options.world, **layout(mode, options.world)}
                results.append(summarise_speedup(per_rank, size["passes"], row))
    kernels = ring_kernels.run(size, options.kernels, options.kernels_before, common)
    return {
        "size": {k: size[k] for k in ("batch", "tokens", "heads", "head_dim", "dtype", "layer")},
        "results": results,
        "kernels": kernels,
        "notes": [
            "speedup = one-process time / parallel time, the median over runs of each run's"
            " ratio; ideal = world size",
            "cpu-time speedup (CPU only) = the same ratio of process CPU time (busiest rank):"
            " it leaves out waiting for cores taken by other processes and for peers",
            "the one-process reference runs on rank 0 of the same workers (one device; on CPU"
            " one worker's threads) interleaved with the parallel iterations",
            "backward = forward + backward with a gradient of ones; parameter gradients are"
            " not reduced over sp (a training step's DDP does that)",
            "kernels: one ring rank's block work on one device (ring_attention on a"
            " LocalRing: r blocks of tokens/r queries x tokens/r keys and the merges, no"
            " communication) vs one SDPA of the same queries over all tokens; ratio ="
            " SDPA time / ring-rank time (1.00 = as fast), median over runs of per-run"
            " ratios; peak = CUDA memory above what was allocated before one call",
        ],
    }


def table(report: dict[str, Any]) -> str:
    from vidpar.benchmarks import ring_kernels

    size = report["size"]
    head = (
        f"attention: batch {size['batch']} × {size['tokens']} tokens × {size['heads']} heads "
        f"× {size['head_dim']}, {size['dtype']}"
    )
    parts = []
    if report["results"]:
        parts.append(f"{head}, layer={size['layer']}\n" + speedup_table(report["results"]))
    if report["kernels"]["rows"]:
        parts.append(f"kernels, {head}\n" + ring_kernels.table(report["kernels"]))
    return "\n\n".join(parts)
