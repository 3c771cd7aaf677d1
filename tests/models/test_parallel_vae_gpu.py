"""The Wan2.1 VAE (the published config, random weights) decoding 81 × 480 × 832 on CUDA
in bf16: the whole VAE's time and peak memory on one GPU, and, where the host has 2 (4)
GPUs, ``parallelize_vae`` over 2 (4) of them against the whole VAE on the first: the
same video (to bf16 rounding), each rank's peak memory (≤ 0.6× / 0.35× the whole VAE's)
and the time. Numbers are printed and written as JSON to
``$VIDPAR_GPU_OUT`` (default: pytest's tmp folder). Marked ``gpu``."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

pytestmark = pytest.mark.gpu

#: [B, C, T, H, W] latents of an 81-frame 480 × 832 video (4× in time, 8× in space).
LATENT = (1, 16, 21, 60, 104)
VIDEO = (1, 3, 81, 480, 832)


def _out_dir(tmp_path: Path) -> Path:
    out = Path(os.environ.get("VIDPAR_GPU_OUT", tmp_path))
    out.mkdir(parents=True, exist_ok=True)
    return out


def _wan21_vae(device: torch.device):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)  # AutoencoderKLWan()'s defaults are Wan2.1's published config
    return AutoencoderKLWan().to(device, torch.bfloat16).eval()


def _latents(device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(LATENT, generator=generator).to(device, torch.bfloat16)


@torch.no_grad()
def _timed_decode(vae, latents: torch.Tensor, runs: int) -> tuple[torch.Tensor, list[float]]:
    """The video and the seconds of each of ``runs`` decodes after one warm-up."""
    vae.decode(latents[:, :, :2])  # warm-up: kernels and cuDNN plans
    seconds = []
    torch.cuda.reset_peak_memory_stats()
    for _ in range(runs):
        torch.cuda.synchronize()
        begin = time.perf_counter()
        video = vae.decode(latents).sample
        torch.cuda.synchronize()
        seconds.append(time.perf_counter() - begin)
    return video, seconds


def test_wan21_vae_decode_on_one_gpu(tmp_path):
    device = torch.device("cuda", 0)
    vae = _wan21_vae(device)
    base = torch.cuda.memory_allocated(device)
    video, seconds = _timed_decode(vae, _latents(device), runs=2)
    peak = torch.cuda.max_memory_allocated(device) - base
    assert video.shape == VIDEO and torch.isfinite(video).all()
    result = {"world": 1, "seconds": seconds, "peak_gib": peak / 2**30, "device": _name()}
    (_out_dir(tmp_path) / "parallel_vae_world1.json").write_text(json.dumps(result))
    print(result)


def _name() -> str:
    return torch.cuda.get_device_name(0)


def _rank(rank: int, world: int, port: int, out: str) -> None:
    from vidpar.config import ParallelConfig
    from vidpar.distributed import parallel_context
    from vidpar.models import parallelize_vae

    with parallel_context(
        ParallelConfig(sp=world),
        world_size=world,
        rank=rank,
        local_rank=rank,
        init_method=f"tcp://127.0.0.1:{port}",
    ) as state:
        vae = _wan21_vae(state.device)
        latents = _latents(state.device)
        base = torch.cuda.memory_allocated(state.device)
        result = {"rank": rank}
        if rank == 0:  # the whole VAE first, on this GPU alone
            whole, seconds = _timed_decode(vae, latents, runs=1)
            peak = torch.cuda.max_memory_allocated(state.device) - base
            whole = whole.float().cpu()
            result |= {"whole_seconds": seconds, "whole_peak_gib": peak / 2**30}
        parallelize_vae(vae)
        video, seconds = _timed_decode(vae, latents, runs=2)
        peak = torch.cuda.max_memory_allocated(state.device) - base
        result |= {"seconds": seconds, "peak_gib": peak / 2**30}
        if rank == 0:
            difference = (video.float().cpu() - whole).abs()
            result["max_abs_diff"] = difference.max().item()
            result["mean_abs_diff"] = difference.mean().item()
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))


@pytest.mark.parametrize("world", [2, 4])
def test_wan21_vae_split_decode_over_gpus(tmp_path, world):
    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} GPUs, this host has {torch.cuda.device_count()}")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.start_processes(_rank, (world, port, str(tmp_path)), nprocs=world, start_method="spawn")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    result = {"world": world, "device": _name(), "ranks": ranks}
    (_out_dir(tmp_path) / f"parallel_vae_world{world}.json").write_text(json.dumps(result))
    print(result)
    # bf16 convolutions over other shapes round differently; the video is in [-1, 1].
    assert ranks[0]["mean_abs_diff"] < 1e-2
    whole_peak = ranks[0]["whole_peak_gib"]
    assert max(r["peak_gib"] for r in ranks) <= {2: 0.6, 4: 0.35}[world] * whole_peak
