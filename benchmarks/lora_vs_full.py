"""Peak GPU memory and step time of LoRA vs full fine-tuning of a Wan2.1-1.3B-sized
diffusers transformer (random weights) at 32,760 tokens (21 × 60 × 104 latents, patch
1 × 2 × 2: Wan2.1 at 81 × 480 × 832), bf16 weights, activation checkpointing, AdamW.

A step is forward, flow-matching-style MSE loss, backward and the optimizer step, through
``vidpar.models.parallelize`` at world 1 and, for LoRA, ``vidpar.nn.lora_layers.add_lora``
(rank 32, Wan's default targets). Run on one GPU: ``python benchmarks/lora_vs_full.py
[--steps N] [--rank R]``; prints a table and writes ``$OUT/lora_vs_full.json``."""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path

import torch

from vidpar import ParallelConfig
from vidpar.distributed.state import parallel_context
from vidpar.models import parallelize
from vidpar.nn.lora_layers import LoraSettings, add_lora

sys.path.insert(0, str(Path(__file__).parent))
from pipeline_stages import WAN_1P3B  # diffusers' Wan2.1-T2V-1.3B config

LATENTS = (1, 16, 21, 60, 104)  # 21 · 30 · 52 = 32,760 tokens after the 1×2×2 patches
TEXT = (1, 512, 4096)


def measure(variant: str, rank: int, steps: int, device: torch.device) -> dict[str, float]:
    """Warm-up step, then ``steps`` timed steps; the peak memory over all of them."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    with torch.device(device):
        model = WanTransformer3DModel(**WAN_1P3B).to(torch.bfloat16)
    model = parallelize(model)
    if variant == "lora":
        add_lora(model, LoraSettings(rank=rank, alpha=rank))
    model.enable_gradient_checkpointing()
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    gen = torch.Generator(device).manual_seed(0)
    x = torch.randn(LATENTS, device=device, dtype=torch.bfloat16, generator=gen)
    text = torch.randn(TEXT, device=device, dtype=torch.bfloat16, generator=gen)
    target = torch.randn(LATENTS, device=device, dtype=torch.bfloat16, generator=gen)
    t = torch.tensor([500.0], device=device)

    def step() -> None:
        out = model(x, t, text, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(out.float(), target.float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    torch.cuda.reset_peak_memory_stats(device)
    step()  # warm-up: allocates the optimizer's state
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - start) / steps
    result = {
        "variant": variant,
        "trainable_params": sum(p.numel() for p in trainable),
        "total_params": sum(p.numel() for p in model.parameters()),
        "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30,
        "step_s": seconds,
    }
    return result


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rank", type=int, default=32)
    args = parser.parse_args()
    device = torch.device("cuda")
    # A layout of one: vidpar's attention path, nothing to communicate.
    with parallel_context(
        ParallelConfig(), world_size=1, rank=0, init_method=f"tcp://127.0.0.1:{_free_port()}"
    ):
        rows = []
        for variant in ("full", "lora"):
            rows.append(measure(variant, args.rank, args.steps, device))
            torch.cuda.empty_cache()  # the previous model is gone: start from nothing
    print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    print("| variant | trainable params | peak memory (GiB) | step (s) |")
    print("| --- | ---: | ---: | ---: |")
    for r in rows:
        name = r["variant"] if r["variant"] == "full" else f"LoRA rank {args.rank}"
        print(f"| {name} | {r['trainable_params']:,} | {r['peak_gib']:.2f} | {r['step_s']:.3f} |")
    out = os.environ.get("OUT", ".")
    with open(os.path.join(out, "lora_vs_full.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(device), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
