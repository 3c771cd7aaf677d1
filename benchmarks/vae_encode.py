"""GPU benchmark (not run in the suite): the preprocessing rate of ``vidpar-preprocess``'s
VAE encode at world 1 — Wan2.1's ``AutoencoderKLWan`` (diffusers' default config, the
published one) with random weights, one 81 × 480 × 832 clip in [-1, 1] encoded to its
normalised latent mean as :mod:`vidpar.data.preprocess` does — in videos per minute (the
median of ``--runs`` encodes after a warm-up) and the peak GPU memory.

    python benchmarks/vae_encode.py --runs 3 --out vae_encode.json
    python benchmarks/vae_encode.py --tiny   # a CPU dry run: the tiny VAE, 5 × 16 × 16
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from vidpar.models.parallel_vae import parallelize_vae

VIDEO = {"num_frames": 81, "height": 480, "width": 832}
TINY_VIDEO = {"num_frames": 5, "height": 16, "width": 16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(tiny: bool, runs: int, dtype: torch.dtype) -> dict:
    """Seconds of each encode, the rate and the peak memory."""
    from diffusers import AutoencoderKLWan

    from vidpar.models.testing import TINY_WAN_VAE

    device = torch.device("cpu" if tiny else "cuda")
    size = TINY_VIDEO if tiny else VIDEO
    with device:
        torch.manual_seed(0)
        vae = AutoencoderKLWan(**(TINY_WAN_VAE if tiny else {})).to(dtype).eval()
    vae = parallelize_vae(vae.requires_grad_(False))  # world 1: whole, as preprocess runs it
    config = vae.config
    mean = torch.tensor(config.latents_mean, device=device).view(1, -1, 1, 1, 1)
    std = torch.tensor(config.latents_std, device=device).view(1, -1, 1, 1, 1)
    gen = torch.Generator(device=device).manual_seed(0)
    clip = torch.rand(
        1, 3, size["num_frames"], size["height"], size["width"], generator=gen, device=device
    )
    clip = (clip * 2 - 1).to(dtype)

    def encode() -> torch.Tensor:
        with torch.no_grad():
            z = vae.encode(clip).latent_dist.mean
            return (z.float() - mean) / std

    latents = encode()  # warm-up (cuDNN's algorithm search)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = []
    for _ in range(runs):
        _sync(device)
        start = time.perf_counter()
        encode()
        _sync(device)
        seconds.append(time.perf_counter() - start)
    median = statistics.median(seconds)
    return {
        "video": size,
        "dtype": str(dtype).removeprefix("torch."),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "latents": list(latents.shape),
        "finite": bool(latents.isfinite().all()),
        "seconds": seconds,
        "median_s": median,
        "videos_per_min": 60.0 / median,
        "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30
        if device.type == "cuda"
        else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--tiny", action="store_true", help="CPU dry run with the tiny VAE")
    parser.add_argument("--out", default=None, help="write the result as JSON here")
    args = parser.parse_args()
    result = measure(args.tiny, args.runs, getattr(torch, args.dtype))
    print(
        f"Wan2.1 VAE encode {result['video']} {result['dtype']} on {result['device']}: "
        f"median {result['median_s']:.2f} s = {result['videos_per_min']:.1f} videos/min, "
        f"peak {result['peak_gib'] or 0:.1f} GiB, latents {result['latents']}"
    )
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
