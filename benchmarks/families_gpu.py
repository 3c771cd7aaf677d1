"""GPU benchmark (not run in the suite): each diffusers family vidpar runs from a plan, at its
published size (the diffusers class's default config, random weights, bf16) and a real video
size, forward through :func:`vidpar.models.parallelize` at world 1 against the same plain
diffusers model, iterations interleaved, median of several.

    python benchmarks/families_gpu.py --out results.json --runs 5

Both models share one set of weights: the plain model runs with diffusers' own attention
processors, then the plan's processors are swapped in (``parallelize`` inside a layout of
one rank) and swapped back out each iteration, so no second copy of a 13 B model is held.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable

import torch

#: Family -> (diffusers class, config overrides, inputs(batch, device) at the video size).
#: Default configs are the published ones (HunyuanVideo 13 B, LTX-Video 2 B, Mochi 1 10 B,
#: SkyReels-V2 1.3 B's Wan-shaped default); the video sizes are stated in the result.


def _randn(*shape: int, device: str) -> torch.Tensor:
    return torch.randn(shape, device=device, dtype=torch.bfloat16)


def hunyuan_inputs(device: str) -> dict:
    # 544 × 960, 61 frames: latent 16 × 68 × 120, 32,640 tokens; 256 text tokens.
    mask = torch.ones(1, 256, device=device)
    mask[:, 200:] = 0
    return {
        "hidden_states": _randn(1, 16, 16, 68, 120, device=device),
        "timestep": torch.tensor([500.0], device=device),
        "encoder_hidden_states": _randn(1, 256, 4096, device=device),
        "encoder_attention_mask": mask,
        "pooled_projections": _randn(1, 768, device=device),
        "guidance": torch.tensor([6000.0], device=device),
    }


def ltx_inputs(device: str) -> dict:
    # 768 × 512, 121 frames: latent 16 × 16 × 24 (patch 1): 6,144 tokens; 128 text tokens.
    return {
        "hidden_states": _randn(1, 16 * 16 * 24, 128, device=device),
        "encoder_hidden_states": _randn(1, 128, 4096, device=device),
        "timestep": torch.tensor([500.0], device=device),
        "encoder_attention_mask": torch.ones(1, 128, device=device),
        "num_frames": 16,
        "height": 16,
        "width": 24,
    }


def mochi_inputs(device: str) -> dict:
    # 480 × 848, 37 frames: latent 7 × 60 × 106: 11,130 tokens; 256 text tokens.
    return {
        "hidden_states": _randn(1, 12, 7, 60, 106, device=device),
        "encoder_hidden_states": _randn(1, 256, 4096, device=device),
        "timestep": torch.tensor([500.0], device=device),
        "encoder_attention_mask": torch.ones(1, 256, device=device, dtype=torch.bool),
    }


def skyreels_inputs(device: str) -> dict:
    # 480 × 832, 81 frames: latent 21 × 60 × 104: 32,760 tokens; 512 text tokens.
    return {
        "hidden_states": _randn(1, 16, 21, 60, 104, device=device),
        "timestep": torch.tensor([500.0], device=device),
        "encoder_hidden_states": _randn(1, 512, 4096, device=device),
    }


FAMILIES: dict[str, tuple[str, dict, Callable[[str], dict]]] = {
    "ltx": ("LTXVideoTransformer3DModel", {}, ltx_inputs),
    "skyreels_v2": ("SkyReelsV2Transformer3DModel", {}, skyreels_inputs),
    "mochi": ("MochiTransformer3DModel", {}, mochi_inputs),
    "hunyuan_video": ("HunyuanVideoTransformer3DModel", {}, hunyuan_inputs),
}


def _time(fn: Callable[[], object]) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(family: str, runs: int) -> dict:
    import diffusers

    from vidpar.models import parallelize

    class_name, overrides, make_inputs = FAMILIES[family]
    cls = getattr(diffusers, class_name)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = cls(**overrides)
    finally:
        torch.set_default_dtype(previous)
    model.eval().requires_grad_(False)
    params = sum(p.numel() for p in model.parameters())
    inputs = make_inputs("cuda")
    attentions = [m for m in model.modules() if hasattr(m, "processor")]
    plain_processors = [m.processor for m in attentions]
    parallelize(model)
    vidpar_processors = [m.processor for m in attentions]
    return _compare(model, inputs, attentions, plain_processors, vidpar_processors, runs) | {
        "class": class_name,
        "parameters": params,
    }


def _compare(model, inputs, attentions, plain_processors, vidpar_processors, runs) -> dict:
    """Forward medians with diffusers' processors and with the plan's, interleaved."""

    def forward(processors) -> None:
        for module, processor in zip(attentions, processors, strict=True):
            module.processor = processor
        with torch.no_grad():
            model(**inputs, return_dict=False)

    for processors in (plain_processors, vidpar_processors):  # warm-up
        forward(processors)
    times: dict[str, list[float]] = {"diffusers": [], "vidpar": []}
    for _ in range(runs):
        times["diffusers"].append(_time(lambda: forward(plain_processors)))
        times["vidpar"].append(_time(lambda: forward(vidpar_processors)))
    medians = {k: statistics.median(v) for k, v in times.items()}
    return {
        "seconds": times,
        "median_s": medians,
        "vidpar_over_diffusers_time": medians["vidpar"] / medians["diffusers"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", default="families_gpu.json")
    args = parser.parse_args()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29561")
    from vidpar import ParallelConfig
    from vidpar.distributed import parallel_context

    results = {"torch": torch.__version__, "device": torch.cuda.get_device_name(0)}
    with parallel_context(ParallelConfig(), world_size=1, rank=0, local_rank=0):
        for family in args.families.split(","):
            try:
                results[family] = measure(family, args.runs)
                torch.cuda.empty_cache()
            except Exception as error:  # one family's failure does not lose the others
                results[family] = {"error": f"{type(error).__name__}: {error}"}
            print(family, json.dumps(results[family], default=str)[:400], flush=True)
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1, default=str)
    print(f"{'family':16} {'diffusers s':>12} {'vidpar s':>10} {'ratio':>7}")
    for family in args.families.split(","):
        r = results[family]
        if "median_s" in r:
            m = r["median_s"]
            ratio = r["vidpar_over_diffusers_time"]
            print(f"{family:16} {m['diffusers']:12.3f} {m['vidpar']:10.3f} {ratio:7.3f}")
        else:
            print(f"{family:16} {r['error'][:60]}")


if __name__ == "__main__":
    main()
