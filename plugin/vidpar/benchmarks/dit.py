"""``dit``: a VideoDiT forward (and forward + backward) under sequence or tensor
parallelism against the same model in one process, in the same run.

Every mode builds the model after the same seed, so all layouts hold the same weights
(the zero-initialised adaLN and output layers get small random values, so the output is
not trivially zero and the check means something). As in the ``attention`` suite, the
one-process model runs on rank 0 of the same workers, interleaved with the parallel
iterations, and a parallel iteration's time is its slowest rank's.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Any

import torch

from vidpar.benchmarks.common import (
    Common,
    check_choices,
    interleaved_runs,
    speedup_table,
    summarise_speedup,
    torch_dtype,
    use_layout,
)

#: Mode -> layout (world = product of the sizes).
MODES: dict[str, dict[str, int]] = {
    "sp2": {"ulysses": 2},
    "ring2": {"ring": 2},
    "tp2": {"tp": 2},
    "usp2x2": {"ulysses": 2, "ring": 2},
    "tp2_sp2": {"tp": 2, "ulysses": 2},
    "sp4": {"ulysses": 4},
    "tp4": {"tp": 4},
}
PASSES = ("forward", "backward")
#: conf/model/wan_like_1p3b.yaml (Wan2.1-1.3B sizes) at 480p × 81 frames: 32,760 tokens.
GPU_MODEL = {"in_channels": 16, "hidden_size": 1536, "num_heads": 12, "depth": 30}
GPU_LATENT = [21, 60, 104]
#: A small CPU DiT (hidden 64, 4 heads, depth 2) at 8 × 32 × 32 latent pixels: 2,048 tokens.
CPU_MODEL = {"in_channels": 3, "hidden_size": 64, "num_heads": 4, "depth": 2}
CPU_LATENT = [8, 32, 32]


@dataclass
class DiTOptions:
    """``model``: DiTConfig fields over the device's default (:data:`GPU_MODEL` on CUDA,
    :data:`CPU_MODEL` on CPU); ``latent``: ``[T, H, W]`` of the latent video (patch 1×2×2);
    ``checkpointing``: recompute each block's activations in backward, as video DiTs
    are trained (``None``: on for CUDA, where the full model's backward at 32k tokens
    does not fit one 80 GB GPU without it; off on CPU).

    ``compare="wan"`` runs the one-device comparison of :mod:`vidpar.benchmarks.dit_compare`
    instead of the layouts (``world`` and ``modes`` unused): vidpar eager and compiled
    against diffusers' Wan eager and compiled, with ``text`` text tokens (``None``: 512
    on CUDA, 8 on CPU) and ``compile_backend`` (``None``: inductor on CUDA, aot_eager on
    CPU); ``model`` and ``latent`` then default to that module's sizes."""

    world: int = 2
    modes: list[str] = field(default_factory=lambda: ["sp2", "tp2"])
    passes: list[str] = field(default_factory=lambda: list(PASSES))
    model: dict[str, Any] = field(default_factory=dict)
    latent: list[int] | None = None
    batch: int = 1
    dtype: str | None = None
    checkpointing: bool | None = None
    compare: str | None = None
    text: int | None = None
    compile_backend: str | None = None


def resolved(options: DiTOptions, common: Common) -> dict[str, Any]:
    """Model sizes, latent shape, dtype and modes of this run, checked."""
    from vidpar.nn.dit import DiTConfig

    model = {**(GPU_MODEL if common.cuda else CPU_MODEL), **(options.model or {})}
    model.setdefault("num_classes", 4)
    config = DiTConfig(**model)
    latent = list(options.latent or (GPU_LATENT if common.cuda else CPU_LATENT))
    if len(latent) != 3:
        raise ValueError(f"dit.latent must be [T, H, W], got {latent}")
    check_choices("dit mode", options.modes, MODES)
    check_choices("pass", options.passes, PASSES)
    for mode in options.modes:
        world = math.prod(MODES[mode].values())
        if world != options.world:
            raise ValueError(f"mode {mode} needs a world of {world}, but dit.world={options.world}")
        parts = MODES[mode].get("tp", 1) * MODES[mode].get("ulysses", 1)
        if config.num_heads % parts:
            raise ValueError(f"num_heads({config.num_heads}) must divide by tp × ulysses in {mode}")
    patch = config.patch_size
    tokens = math.prod(n // p for n, p in zip(latent, patch, strict=True))
    dtype = options.dtype or ("bfloat16" if common.cuda else "float32")
    return {
        "model": model,
        "latent": latent,
        "tokens": tokens,
        "batch": options.batch,
        "dtype": dtype,
        "passes": list(options.passes),
        "checkpointing": common.cuda if options.checkpointing is None else options.checkpointing,
    }


def build_dit(
    model_sizes: dict[str, Any],
    device: torch.device,
    dtype: torch.dtype,
    checkpointing: bool = False,
):
    """The VideoDiT for the current layout, with every weight non-zero and equal across
    layouts (the zero-initialised replicated layers get seeded small values), its blocks
    optionally under activation checkpointing."""
    from vidpar.nn.dit import DiTConfig, VideoDiT

    torch.manual_seed(0)
    model = VideoDiT(DiTConfig(**model_sizes, activation_checkpointing=checkpointing))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if getattr(param, "tensor_parallel_dim", None) is None and not param.any():
                gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
                param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
    return model.to(device=device, dtype=dtype)


def _step(model, inputs: tuple[torch.Tensor, ...], backward: bool) -> torch.Tensor:
    with torch.set_grad_enabled(backward):
        out = model(*inputs)
        if backward:
            out.float().square().mean().backward()
    return out


def _measure_mode(worker, size: dict[str, Any], mode: str, common: Common) -> dict[str, Any]:
    """In each worker: interleaved one-process and parallel iterations of one mode."""
    from vidpar.distributed import single_process
    from vidpar.distributed import state as ps

    use_layout(**MODES[mode])
    device, dtype = worker.device, torch_dtype(size["dtype"])
    world = ps.get_world_group()
    gen = torch.Generator().manual_seed(1)
    b, c = size["batch"], size["model"]["in_channels"]
    inputs = (
        torch.randn((b, c, *size["latent"]), generator=gen).to(device=device, dtype=dtype),
        torch.rand((b,), generator=gen).to(device),
        torch.randint(0, size["model"]["num_classes"], (b,), generator=gen).to(device),
    )
    with single_process():
        reference = (
            build_dit(size["model"], device, dtype, size["checkpointing"])
            if world.rank_in_group == 0
            else None
        )
    parallel = build_dit(size["model"], device, dtype, size["checkpointing"])

    out: dict[str, Any] = {"mode": mode}
    for pass_name in size["passes"]:
        backward = pass_name == "backward"

        def single_fn(backward: bool = backward) -> None:
            reference.zero_grad(set_to_none=True)
            _step(reference, inputs, backward)

        def parallel_fn(backward: bool = backward) -> None:
            parallel.zero_grad(set_to_none=True)
            _step(parallel, inputs, backward)

        out[pass_name] = interleaved_runs(
            single_fn if reference is not None else None, parallel_fn, world, device, common
        )
    with torch.no_grad():
        got = _step(parallel, inputs, False)
        if reference is not None:
            expect = _step(reference, inputs, False)
            out["max_abs_diff"] = float((got.float() - expect.float()).abs().max())
            out["max_abs_ref"] = float(expect.float().abs().max())
    return out


def run(options: DiTOptions, common: Common) -> dict[str, Any]:
    """Every mode of ``options`` in one world, each against the one-process model."""
    from vidpar.config import ParallelConfig
    from vidpar.executor import Executor

    if options.compare is not None:
        if options.compare != "wan":
            raise ValueError(f"dit.compare must be wan or null, got {options.compare!r}")
        from vidpar.benchmarks import dit_compare

        return dit_compare.run(options, common, build_dit)
    size = resolved(options, common)
    results = []
    with Executor(ParallelConfig(dp=options.world), devices=common.device) as ex:
        for mode in options.modes:
            per_rank = ex.collective_rpc(_measure_mode, size, mode, common)
            row = {"mode": mode, "world": options.world, "layout": MODES[mode]}
            results.append(summarise_speedup(per_rank, size["passes"], row))
    return {
        "size": {
            k: size[k] for k in ("model", "latent", "tokens", "batch", "dtype", "checkpointing")
        },
        "results": results,
        "notes": [
            "speedup = one-process time / parallel time, the median over runs of each run's"
            " ratio; ideal = world size",
            "cpu-time speedup (CPU only) = the same ratio of process CPU time (busiest rank):"
            " it leaves out waiting for cores taken by other processes and for peers",
            "the one-process model runs on rank 0 of the same workers (one device; on CPU one"
            " worker's threads) interleaved with the parallel iterations",
            "backward = forward + backward of mean(out²); no gradient reduction over sp/dp"
            " (a training step's DDP adds that)",
        ],
    }


def table(report: dict[str, Any]) -> str:
    if report.get("compare") == "wan":
        from vidpar.benchmarks import dit_compare

        return dit_compare.table(report)
    size = report["size"]
    model = size["model"]
    head = (
        f"dit: hidden {model['hidden_size']}, {model['num_heads']} heads, depth "
        f"{model['depth']}, latent {size['latent']} -> {size['tokens']} tokens, batch "
        f"{size['batch']}, {size['dtype']}"
        f"{', activation checkpointing' if size.get('checkpointing') else ''}\n"
    )
    return head + speedup_table(report["results"])
