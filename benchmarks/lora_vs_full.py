"""Peak memory and step time of LoRA vs full fine-tuning of a Wan2.1-1.3B-sized diffusers
transformer (random weights) at 32,760 tokens (21 × 60 × 104 latents, patch 1 × 2 × 2:
Wan2.1 at 81 × 480 × 832), bf16, activation checkpointing, AdamW. ``--precision
bf16-true`` (the default) holds every weight, gradient and AdamW moment in bf16;
``bf16-mixed`` is what vidpar's recipes train with (Lightning's ``bf16-mixed``: float32
weights, gradients and moments, the step under bf16 autocast), LoRA's frozen base held
in bf16 as ``DiffusersFlowModule`` holds it (:mod:`vidpar.nn.frozen_weights`).

A step is forward, flow-matching-style MSE loss, backward and the optimizer step, through
``vidpar.models.parallelize`` at world 1 and, for LoRA, ``vidpar.nn.lora_layers.add_lora``
(rank 32, Wan's default targets); both variants take the same model, data and
checkpointing. On one GPU: ``python benchmarks/lora_vs_full.py [--steps N] [--rank R]``
(peak: ``torch.cuda.max_memory_allocated``). Without a GPU: ``--device cpu --size small``
(a narrower, shorter Wan; the peak is the most bytes of tensor storage alive at once,
counted by a dispatch mode), or ``--fake`` (the 1.3B size on fake tensors: the peak of
live bytes without computing anything, no step time). Every variant also reports one
step's FLOPs (``FlopCounterMode``'s formulas), aten op calls and bytes moved, per op in
the JSON, and a roofline time of those on an H100 (:class:`OpCounts`), counted on the
second step (on a GPU, an untimed one after the warm-up). Prints a table and writes
``$OUT/lora_vs_full.json``."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import sys
import time
import weakref
from collections import Counter
from pathlib import Path

import torch
from torch.utils import flop_counter
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from vidpar import ParallelConfig
from vidpar.distributed.state import parallel_context
from vidpar.models import parallelize
from vidpar.nn.frozen_weights import cast_frozen_weights_for_autocast
from vidpar.nn.lora_layers import LoraSettings, add_lora

sys.path.insert(0, str(Path(__file__).parent))
from pipeline_stages import WAN_1P3B  # diffusers' Wan2.1-T2V-1.3B config

#: name: (transformer config, latents shape, text shape). ``small`` keeps 1.3B's ratio of
#: tokens to width (32,760 / 1536 ≈ 2,720 / 128) and its FFN/width ratio, at 2 blocks.
SIZES = {
    "1.3b": (WAN_1P3B, (1, 16, 21, 60, 104), (1, 512, 4096)),
    "small": (
        {
            **WAN_1P3B,
            "num_attention_heads": 2,
            "attention_head_dim": 64,
            "ffn_dim": 747,
            "num_layers": 2,
            "text_dim": 256,
        },
        (1, 16, 5, 32, 68),  # 5 · 16 · 34 = 2,720 tokens
        (1, 64, 256),
    ),
}


#: ``FlopCounterMode``'s formulas (its registry), and those it lacks: the in-place
#: ``addmm_`` (the LoRA update) and the CPU flash attention that stands in for the GPU's
#: under ``--fake``.
_FLOPS = {
    **flop_counter.flop_registry,
    torch.ops.aten.addmm_: flop_counter.flop_registry[torch.ops.aten.addmm],
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: flop_counter.flop_registry[
        torch.ops.aten._scaled_dot_product_flash_attention
    ],
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: (
        flop_counter.flop_registry[torch.ops.aten._scaled_dot_product_flash_attention_backward]
    ),
}
#: Ops that allocate without touching the bytes.
_ALLOCATIONS = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"}
#: The roofline of one H100 SXM (dense bf16 TFLOP/s, HBM3 TB/s) for a step's time model:
#: each op takes the longer of its FLOPs and its bytes at these rates.
H100_FLOPS, H100_BYTES = 989e12, 3.35e12


class OpCounts(TorchDispatchMode):
    """Per aten op of a step: calls, FLOPs (``FlopCounterMode``'s formulas) and the bytes
    its kernel reads and writes (each distinct tensor argument read once, except an
    ``out=`` one; each result written once; views, metadata and allocations move
    nothing), and a roofline time model of the step on an H100."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()
        self.flops: Counter[str] = Counter()
        self.bytes: Counter[str] = Counter()
        self.model_s = 0.0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = str(func.overloadpacket.__name__)
        self.calls[name] += 1
        written = _distinct(out)
        if func.is_view or name in _ALLOCATIONS or not written:
            return out
        reads = _distinct((args, {k: v for k, v in kwargs.items() if k != "out"}))
        moved = sum(t.numel() * t.element_size() for t in [*reads, *written])
        formula = _FLOPS.get(func.overloadpacket)
        flops = 0 if formula is None else formula(*args, **kwargs, out_val=out)
        self.bytes[name] += moved
        self.flops[name] += flops
        self.model_s += max(flops / H100_FLOPS, moved / H100_BYTES)
        return out


def _distinct(tree) -> list[torch.Tensor]:
    """The tensors of a pytree, each once."""
    return list({id(t): t for t in tree_leaves(tree) if isinstance(t, torch.Tensor)}.values())


class LiveBytes(TorchDispatchMode):
    """The bytes of tensor storage alive, and their peak, counting every storage that an
    op under the mode returns (and those passed to :meth:`track`) until it is freed."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: dict[int, int] = {}
        self.now = self.peak = 0

    def track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key not in self.sizes:
            self.sizes[key] = storage.nbytes()
            self.now += self.sizes[key]
            self.peak = max(self.peak, self.now)
            weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.now -= self.sizes.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self.track(leaf)
        return out


def measure(
    variant: str,
    rank: int,
    steps: int,
    device: torch.device,
    size: str,
    fake: bool,
    precision: str = "bf16-true",
) -> dict[str, float | str | int]:
    """Warm-up step, then ``steps`` timed steps; the peak memory of a step after the
    warm-up (the optimizer's state allocated)."""
    from diffusers import WanTransformer3DModel

    config, latents, text_shape = SIZES[size]
    torch.manual_seed(0)
    mode = contextlib.nullcontext()
    if fake:
        from torch._subclasses.fake_tensor import FakeTensorMode

        mode = FakeTensorMode()
    with mode, torch.device(device):
        mixed = precision == "bf16-mixed"
        dtype = torch.float32 if mixed else torch.bfloat16  # of the weights and the data
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # as .to(dtype): fake tensors cannot be swapped
        try:
            model = WanTransformer3DModel(**config)
        finally:
            torch.set_default_dtype(default)
        model = parallelize(model)
        if variant == "lora":
            add_lora(model, LoraSettings(rank=rank, alpha=rank))
            if mixed:  # as DiffusersFlowModule does under bf16-mixed
                cast_frozen_weights_for_autocast(model, torch.bfloat16)
        model.enable_gradient_checkpointing()
        model.train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=1e-5)
        gen = None if fake else torch.Generator(device).manual_seed(0)
        x = torch.randn(latents, dtype=dtype, generator=gen)
        text = torch.randn(text_shape, dtype=dtype, generator=gen)
        target = torch.randn(latents, dtype=dtype, generator=gen)
        t = torch.tensor([500.0])

        autocast = torch.autocast(device.type, torch.bfloat16, enabled=mixed)

        def step() -> None:
            with autocast:  # the forward, as Lightning's MixedPrecision runs training_step
                out = model(x, t, text, return_dict=False)[0]
                loss = torch.nn.functional.mse_loss(out.float(), target.float())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        def sync() -> None:
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        ops = OpCounts()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        else:  # count every storage: the model's, then what the steps allocate
            live = LiveBytes()
            for tensor in [*model.parameters(), *model.buffers(), x, text, target, t]:
                live.track(tensor)
            with live:
                step()  # allocates the optimizer's state
                live.peak = static = live.now
                with ops:
                    step()
            peak = live.peak
        seconds = float("nan")
        if not fake:
            step()  # warm-up (again on CPU, outside the counting modes)
            if device.type == "cuda":
                with ops:
                    step()  # counted as on the CPU: a step after the optimizer's first
            sync()
            if device.type == "cuda":
                static = torch.cuda.memory_allocated(device)
            start = time.perf_counter()
            for _ in range(steps):
                step()
            sync()
            seconds = (time.perf_counter() - start) / steps
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device)
        return {
            "variant": variant,
            "precision": precision,
            "trainable_params": sum(p.numel() for p in trainable),
            "total_params": sum(p.numel() for p in model.parameters()),
            "peak_gib": peak / 2**30,
            "static_gib": static / 2**30,  # weights and optimizer state between steps
            "step_s": seconds,
            "tflop": sum(ops.flops.values()) / 1e12,
            "op_calls": sum(ops.calls.values()),
            "gb_moved": sum(ops.bytes.values()) / 1e9,
            "h100_model_s": ops.model_s,
            "ops": {
                name: {
                    "calls": ops.calls[name],
                    "tflop": ops.flops[name] / 1e12,
                    "gb": ops.bytes[name] / 1e9,
                }
                for name in sorted(ops.calls, key=lambda n: -ops.bytes[n])
            },
        }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--size", default="1.3b", choices=sorted(SIZES))
    parser.add_argument("--fake", action="store_true", help="CPU fake tensors: peak only")
    parser.add_argument("--variants", default="full,lora")
    parser.add_argument("--precision", default="bf16-true", choices=["bf16-true", "bf16-mixed"])
    args = parser.parse_args()
    if args.fake and args.device != "cpu":
        parser.error("--fake counts bytes on the CPU: add --device cpu")
    device = torch.device(args.device)
    # A layout of one: vidpar's attention path, nothing to communicate.
    with parallel_context(
        ParallelConfig(), world_size=1, rank=0, init_method=f"tcp://127.0.0.1:{_free_port()}"
    ):
        rows = []
        for variant in args.variants.split(","):
            rows.append(
                measure(
                    variant, args.rank, args.steps, device, args.size, args.fake, args.precision
                )
            )
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the previous model is gone: start from nothing
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    where = f"{name}{' (fake tensors)' if args.fake else ''}, size {args.size}, {args.precision}"
    print(f"{where}, torch {torch.__version__}")
    print(
        "| variant | trainable params | peak memory (GiB) | between steps (GiB) | step (s) "
        "| TFLOP | op calls | GB moved | H100 roofline (s) |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        label = r["variant"] if r["variant"] == "full" else f"LoRA rank {args.rank}"
        print(
            f"| {label} | {r['trainable_params']:,} | {r['peak_gib']:.3f} "
            f"| {r['static_gib']:.3f} | {r['step_s']:.3f} | {r['tflop']:.4g} "
            f"| {r['op_calls']:,} | {r['gb_moved']:.4g} | {r['h100_model_s']:.4g} |"
        )
    out = os.environ.get("OUT", ".")
    suffix = "" if args.precision == "bf16-true" else f"_{args.precision}"
    with open(os.path.join(out, f"lora_vs_full{suffix}.json"), "w") as f:
        json.dump({"device": where, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
