"""Multi-GPU scaling (issue #33): for each model size, world size and layout of that world
(ulysses, ring, USP, tp, cfg and their mixes), the prompt-to-video generation of
vidpar's DiffusersPipelineGenerator stage by stage, diffusers' own context parallelism
for the transformer forward (CUDA only), and a training step (FSDP2 × sp, activation
checkpointing); speed-up and efficiency against the smallest world, the best layout per
world, a table, JSON and a plot.

    python benchmarks/scaling.py --device cuda --worlds 1,2,4,8 --models 1.3b --steps 4
    python benchmarks/scaling.py --device cpu --worlds 1,2 --models tiny --steps 1

Model folders are random weights at the published configs, written once under ``--root``
(nothing is downloaded): ``tiny`` is vidpar's tiny Wan pipeline, ``1.3b``/``14b`` Wan2.1's
transformers with the UMT5-XXL encoder and Wan2.1's VAE. Sampling steps are reduced
(``--steps``, stated in the JSON). Every process the script starts is an Executor worker,
one per device (no torchrun).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from pipeline_stages import UMT5_XXL, WAN_1P3B

#: Wan2.1-T2V-14B's transformer (40 layers, 40 heads × 128, ffn 13824, text_dim 4096).
WAN_14B = {**WAN_1P3B, "num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40}
#: Video size per model: the published 81 × 480 × 832 for the real sizes, tiny on CPU.
VIDEOS = {
    "tiny": {"num_frames": 5, "height": 16, "width": 16},
    "1.3b": {"num_frames": 81, "height": 480, "width": 832},
    "14b": {"num_frames": 81, "height": 480, "width": 832},
}
#: Training latents ``[T, H, W]`` per model (the latents of the video above).
TRAIN_LATENTS = {"tiny": (3, 8, 8), "1.3b": (21, 60, 104), "14b": (21, 60, 104)}
PROMPT = "a red fox running through snow"
STAGES = ("encode_prompt", "denoise", "decode", "total")
#: Layout dimensions a single video is split over (dp adds videos, not speed).
LAYOUT_DIMS = ("tp", "ulysses", "ring", "cfg")
CUDA_ENV = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}


def layout_name(sizes: dict[str, int]) -> str:
    """``single``, or the dimensions above 1 joined, e.g. ``ulysses2_ring2``."""
    return "_".join(f"{d}{n}" for d, n in sizes.items() if n > 1) or "single"


def layouts(world: int, num_heads: int) -> dict[str, dict[str, int]]:
    """Every tp × ulysses × ring × cfg (cfg ≤ 2) that multiplies to ``world`` and whose
    heads fit (``vidpar.config.ParallelConfig`` and ``check_heads`` decide)."""
    from vidpar.config import ParallelConfig
    from vidpar.models.plan import check_heads

    divisors = [d for d in range(1, world + 1) if world % d == 0]
    found = {}
    for sizes in itertools.product(divisors, repeat=len(LAYOUT_DIMS)):
        named = dict(zip(LAYOUT_DIMS, sizes, strict=True))
        if math.prod(sizes) != world or named["cfg"] > 2:
            continue
        config = ParallelConfig(**named, dp=1)
        try:
            check_heads(config, num_heads)
        except ValueError:
            continue
        found[layout_name(named)] = named
    return found


def write_folder(root: Path, model: str) -> Path:
    """The random-weight pipeline folder of ``model`` (written once)."""
    folder = root / f"wan-{model}-random"
    if (folder / "model_index.json").is_file():
        return folder
    if model == "tiny":
        from vidpar.models.testing import make_tiny_wan_pipeline

        return make_tiny_wan_pipeline(folder)
    from diffusers import (
        AutoencoderKLWan,
        UniPCMultistepScheduler,
        WanPipeline,
        WanTransformer3DModel,
    )
    from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

    from vidpar.models.testing import make_tiny_tokenizer

    make_tiny_tokenizer(folder / "tokenizer")
    config = WAN_1P3B if model == "1.3b" else WAN_14B
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        torch.manual_seed(0)
        pipe = WanPipeline(
            tokenizer=AutoTokenizer.from_pretrained(str(folder / "tokenizer")),
            text_encoder=UMT5EncoderModel(UMT5Config(**UMT5_XXL)).to(torch.bfloat16),
            vae=AutoencoderKLWan(),
            scheduler=UniPCMultistepScheduler(
                prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
            ),
            transformer=WanTransformer3DModel(**config).to(torch.bfloat16),
        )
    pipe.save_pretrained(str(folder))
    del pipe
    return folder


def write_latents(root: Path, model: str, folder: Path) -> Path:
    """A latents folder of 4 samples at ``TRAIN_LATENTS[model]`` for the training step."""
    from vidpar.models.testing import make_tiny_latents

    latents = root / f"latents-{model}"
    if not latents.is_dir():
        make_tiny_latents(latents, folder / "transformer", size=TRAIN_LATENTS[model])
    return latents


# --- in the Executor's workers -------------------------------------------------------------


def _reset_peak(worker) -> None:
    if worker.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(worker.device)


def _peak_gib(worker) -> float | None:
    if worker.device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(worker.device) / 2**30


def _diffusers_cp_forward(worker, folder: str, latent_shape: tuple, steps: int) -> dict[str, Any]:
    """diffusers' own context parallelism (Ulysses over the world) of the transformer:
    seconds per forward (median of ``steps`` after one warm-up) and peak memory."""
    from diffusers import WanTransformer3DModel
    from diffusers.models._modeling_parallel import ContextParallelConfig

    world = torch.distributed.get_world_size()
    model = WanTransformer3DModel.from_pretrained(folder, subfolder="transformer")
    model = model.to(worker.device, torch.bfloat16).eval()
    if world > 1:
        model.set_attention_backend("_native_cudnn")  # a backend diffusers' CP supports
        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
    cfg = model.config
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn((1, *latent_shape), generator=gen).to(worker.device, torch.bfloat16)
    text = torch.randn((1, 512, cfg.text_dim), generator=gen).to(worker.device, torch.bfloat16)
    timestep = torch.tensor([500], device=worker.device)
    seconds = []
    _reset_peak(worker)
    with torch.no_grad():
        for _ in range(steps + 1):
            torch.cuda.synchronize(worker.device)
            start = time.perf_counter()
            model(latents, timestep, text, return_dict=False)
            torch.cuda.synchronize(worker.device)
            seconds.append(time.perf_counter() - start)
    return {"forward_s": sorted(seconds[1:])[len(seconds[1:]) // 2], "peak_gib": _peak_gib(worker)}


def _train_fit(worker, folder: str, latents: str, world: int, ulysses: int, steps: int) -> dict:
    """``steps + 1`` Trainer steps of DiffusersFlowModule (gradient checkpointing) with
    ``VidParStrategy`` (FSDP2 over dp × sp with sp = the world); steps/s after the first."""
    import lightning.pytorch as pl

    from vidpar.benchmarks.lightning_models import (
        StepTimer,
        quiet_lightning,
        restore_worker_environment,
    )
    from vidpar.data import LatentsDataModule
    from vidpar.lightning import DiffusersFlowModule, VidParStrategy

    restore_worker_environment(worker)
    quiet_lightning()
    cuda = worker.device.type == "cuda"
    module = DiffusersFlowModule(path=folder, subfolder="transformer", gradient_checkpointing=True)
    timer = StepTimer()
    trainer = pl.Trainer(
        accelerator="gpu" if cuda else "cpu",
        devices=world,
        strategy=VidParStrategy(ulysses=ulysses, ring=world // ulysses, data_parallel="fsdp"),
        max_steps=steps + 1,
        # On gloo, FSDP2's fp32 gradients over sp need PREMUL_SUM, which gloo lacks: float64
        # takes FSDP2's pre/post-divide path instead (CPU numbers are not results anyway).
        precision="bf16-mixed" if cuda else "64-true",
        logger=False,
        callbacks=[timer],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,  # dp = 1: every rank reads the same batch
    )
    _reset_peak(worker)
    trainer.fit(module, datamodule=LatentsDataModule(latents, batch_size=1, shuffle=False))
    result = timer.result(skip=1)
    return {
        "steps_per_s": result["steps_per_s"],
        "median_step_s": result["median_step_s"],
        "peak_gib": _peak_gib(worker),
    }


# --- in this process -----------------------------------------------------------------------


def devices_for(device: str, world: int) -> list[str] | str:
    return [f"cuda:{i}" for i in range(world)] if device == "cuda" else "cpu"


def measure_generation(
    folder: Path, sizes: dict[str, int], device: str, world: int, model: str, steps: int
) -> dict[str, Any]:
    """One warm-up generation (1 step), then the timed one: seconds per stage on rank 0
    (``generator.last_timings``), the whole call, the collectives of rank 0 and peak
    memory per rank (CUDA: ``torch.cuda.max_memory_allocated``, reset before the timed
    generation)."""
    from vidpar.config import ParallelConfig
    from vidpar.distributed.telemetry import summarize
    from vidpar.pipelines import DiffusersPipelineGenerator

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    parallel = ParallelConfig(**sizes, dp=1)
    with DiffusersPipelineGenerator(
        folder, parallel, dtype=dtype, devices=devices_for(device, world)
    ) as gen:
        gen.generate(PROMPT, steps=1, **VIDEOS[model])
        gen.executor.collective_rpc(_reset_peak)
        start = time.perf_counter()
        gen.generate(PROMPT, steps=steps, **VIDEOS[model])
        total = time.perf_counter() - start
        peaks = gen.executor.collective_rpc(_peak_gib)
        collectives = [
            {
                "group": s.group,
                "op": s.op,
                "calls": s.calls,
                "bytes": s.nbytes,
                "seconds": s.seconds,
            }
            for s in summarize(gen.last_records)
        ]
    return {
        "stages_s": {**{k: v for k, v in gen.last_timings.items() if k in STAGES}, "total": total},
        "collectives": collectives,
        "peak_gib_per_rank": peaks if device == "cuda" else None,
    }


def measure_diffusers_cp(folder: Path, device: str, world: int, model: str, steps: int, heads: int):
    from vidpar.config import ParallelConfig
    from vidpar.executor import Executor
    from vidpar.pipelines.pipeline_folder import read_pipeline_folder

    if device != "cuda":
        return {"skipped": "diffusers' context parallelism needs NCCL: run with --device cuda"}
    if heads % world:
        return {"skipped": f"ulysses_degree={world} does not divide {heads} heads"}
    with Executor(ParallelConfig(dp=world), devices=devices_for(device, world)) as ex:
        latent_shape = read_pipeline_folder(folder).latent_shape(*VIDEOS[model].values())
        per_rank = ex.collective_rpc(_diffusers_cp_forward, str(folder), latent_shape, steps)
    return {
        "forward_s": per_rank[0]["forward_s"],
        "peak_gib_per_rank": [r["peak_gib"] for r in per_rank],
    }


def measure_training(
    folder: Path, latents: Path, device: str, world: int, steps: int, heads: int
) -> dict[str, Any]:
    from vidpar.config import ParallelConfig
    from vidpar.executor import Executor

    ulysses = max(d for d in range(1, world + 1) if world % d == 0 and d <= heads)
    with Executor(
        ParallelConfig(dp=world), devices=devices_for(device, world), init_distributed=False
    ) as ex:
        per_rank = ex.collective_rpc(_train_fit, str(folder), str(latents), world, ulysses, steps)
    return {
        "layout": layout_name({"ulysses": ulysses, "ring": world // ulysses}),
        "steps_per_s": per_rank[0]["steps_per_s"],
        "median_step_s": per_rank[0]["median_step_s"],
        "peak_gib_per_rank": [r["peak_gib"] for r in per_rank] if device == "cuda" else None,
    }


def speedups(result: dict[str, Any]) -> dict[str, Any]:
    """Per stage and world: the best layout's seconds, speed-up over the smallest world
    measured and efficiency (speed-up / (world / smallest world))."""
    by_world = result["worlds"]
    worlds = sorted(int(w) for w in by_world)
    summary: dict[str, Any] = {}
    best_layout = {}
    for world in worlds:
        gens = by_world[str(world)]["generation"]
        ok = {k: v for k, v in gens.items() if "stages_s" in v}
        if ok:
            best_layout[str(world)] = min(ok, key=lambda k: ok[k]["stages_s"]["total"])
    for stage in STAGES:
        seconds = {}
        for world in worlds:
            name = best_layout.get(str(world))
            if name is not None:
                value = by_world[str(world)]["generation"][name]["stages_s"].get(stage)
                if value is not None:
                    seconds[world] = value
        summary[f"generation.{stage}"] = _scale(seconds)
    cp = {
        w: by_world[str(w)]["diffusers_cp"]["forward_s"]
        for w in worlds
        if "forward_s" in by_world[str(w)]["diffusers_cp"]
    }
    summary["diffusers_cp.forward"] = _scale(cp)
    train = {
        w: 1.0 / by_world[str(w)]["training"]["steps_per_s"]
        for w in worlds
        if "steps_per_s" in by_world[str(w)]["training"]
    }
    summary["training.step"] = _scale(train)
    return {"best_layout": best_layout, "stages": summary}


def _scale(seconds: dict[int, float]) -> dict[str, Any]:
    if not seconds:
        return {}
    base_world = min(seconds)
    base = seconds[base_world]
    return {
        str(w): {
            "seconds": s,
            "speedup": base / s,
            "efficiency": base / s / (w / base_world),
        }
        for w, s in sorted(seconds.items())
    }


def print_table(model: str, result: dict[str, Any]) -> None:
    print(
        f"\n== {model}: seconds (speed-up, efficiency) vs world {min(map(int, result['worlds']))}"
    )
    for world, entry in sorted(result["worlds"].items(), key=lambda kv: int(kv[0])):
        for name, gen in entry["generation"].items():
            if "stages_s" not in gen:
                print(f"world {world:>2} {name:<24} failed: {gen['error']}")
                continue
            cells = " ".join(f"{s}={gen['stages_s'].get(s, float('nan')):.3f}" for s in STAGES)
            print(f"world {world:>2} {name:<24} {cells}")
    for stage, per_world in result["scaling"]["stages"].items():
        cells = "  ".join(
            f"{w}: {v['seconds']:.3f}s ({v['speedup']:.2f}×, {v['efficiency']:.0%})"
            for w, v in per_world.items()
        )
        print(f"{stage:<26} {cells or 'not measured'}")
    print("best layout per world:", result["scaling"]["best_layout"])


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    top = 1
    for model, result in results.items():
        for stage, per_world in result["scaling"]["stages"].items():
            if per_world:
                worlds = [int(w) for w in per_world]
                top = max(top, *worlds)
                ax.plot(
                    worlds,
                    [v["speedup"] for v in per_world.values()],
                    "o-",
                    label=f"{model} {stage}",
                )
    ax.plot([1, top], [1, top], "k--", lw=0.8, label="linear")
    ax.set_xlabel("GPUs (world size)")
    ax.set_ylabel("speed-up vs smallest world")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    parser.add_argument("--worlds", default="1,2,4,8", help="comma-separated world sizes")
    parser.add_argument("--models", default="1.3b", help="comma-separated: tiny, 1.3b, 14b")
    parser.add_argument("--steps", type=int, default=4, help="sampling/training steps (reduced)")
    parser.add_argument("--layouts", default=None, help="comma-separated layout names to keep")
    parser.add_argument("--root", type=Path, default=Path("/tmp/vidpar-scaling"))
    parser.add_argument("--out", type=Path, default=Path("scaling.json"))
    parser.add_argument("--plot", type=Path, default=None, help="a PNG of speed-up vs GPUs")
    args = parser.parse_args(argv)
    try:
        args.worlds = sorted({int(w) for w in args.worlds.split(",")})
    except ValueError:
        parser.error(f"--worlds={args.worlds!r} must be comma-separated integers, e.g. 1,2,4")
    if min(args.worlds) < 1:
        parser.error(f"--worlds={args.worlds} must be positive")
    args.models = args.models.split(",")
    unknown = [m for m in args.models if m not in VIDEOS]
    if unknown:
        parser.error(f"--models: unknown {unknown}; choose from {list(VIDEOS)}")
    if args.steps < 1:
        parser.error(f"--steps={args.steps} must be at least 1")
    args.layouts = None if args.layouts is None else set(args.layouts.split(","))
    if args.device == "cuda":
        if not torch.cuda.is_available():
            parser.error("--device cuda but no GPU is visible: use --device cpu")
        if max(args.worlds) > torch.cuda.device_count():
            parser.error(
                f"--worlds={args.worlds} needs {max(args.worlds)} GPUs, "
                f"{torch.cuda.device_count()} visible"
            )
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.device == "cuda":
        os.environ.update(CUDA_ENV)  # the workers inherit it
    args.root.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    for model in args.models:
        folder = write_folder(args.root, model)
        latents = write_latents(args.root, model, folder)
        heads = json.loads((folder / "transformer" / "config.json").read_text())[
            "num_attention_heads"
        ]
        result: dict[str, Any] = {"video": VIDEOS[model], "steps": args.steps, "worlds": {}}
        for world in args.worlds:
            names = layouts(world, heads)
            if args.layouts is not None:
                names = {k: v for k, v in names.items() if k in args.layouts}
            entry: dict[str, Any] = {"generation": {}}
            for name, sizes in names.items():
                print(f"[{model} world {world}] generation {name}", flush=True)
                try:
                    entry["generation"][name] = measure_generation(
                        folder, sizes, args.device, world, model, args.steps
                    )
                except Exception as exc:  # one layout's failure (e.g. memory) is a row
                    entry["generation"][name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            print(f"[{model} world {world}] diffusers context parallelism", flush=True)
            entry["diffusers_cp"] = measure_diffusers_cp(
                folder, args.device, world, model, args.steps, heads
            )
            print(f"[{model} world {world}] training step", flush=True)
            entry["training"] = measure_training(
                folder, latents, args.device, world, args.steps, heads
            )
            result["worlds"][str(world)] = entry
        result["scaling"] = speedups(result)
        results[model] = result
        print_table(model, result)
    output = {
        "device": args.device,
        "device_name": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "results": results,
        "notes": [
            f"sampling and training steps reduced to {args.steps}; stage seconds are rank 0's"
            " (generator.last_timings) after a 1-step warm-up generation",
            "compiled generation: not measured, DiffusersPipelineGenerator has no compile option",
            "peak memory: torch.cuda.max_memory_allocated per rank, reset before the timed"
            " generation (CUDA only)",
            "diffusers context parallelism: transformer forward, ulysses_degree = world,"
            " 512 text tokens, bf16"
            + ("" if args.device == "cuda" else "; skipped on CPU (needs NCCL)"),
            "training: DiffusersFlowModule, gradient checkpointing, VidParStrategy"
            " data_parallel=fsdp with sp = world (ulysses up to the heads, ring the rest),"
            " batch 1, bf16-mixed on CUDA, float64 on CPU (gloo has no PREMUL_SUM for FSDP2's"
            " fp32 reduce-scatter over sp); steps/s after the first step",
            "speed-up: the best layout's seconds at the smallest world over each world's",
        ],
    }
    args.out.write_text(json.dumps(output, indent=1))
    if args.plot is not None:
        plot(results, args.plot)
    print(f"wrote {args.out}" + (f" and {args.plot}" if args.plot else ""))
    return output


if __name__ == "__main__":
    main()
