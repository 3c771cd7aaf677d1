"""``models``: a diffusers video transformer through :func:`vidpar.models.parallelize` at
world 1 against the same plain diffusers model, in the same run.

On CUDA the model is the Wan2.1-1.3B-sized ``WanTransformer3DModel`` (random weights) at
480p × 81 frames: latent ``[21, 60, 104]``, 32,760 tokens, 512 text tokens, bf16 with
the modules diffusers keeps in float32 kept so (as ``from_pretrained(torch_dtype=...)``);
forward, and forward + backward with diffusers' gradient checkpointing. Both models live
in one Executor worker (a layout of size 1) and hold the same weights; their iterations
are interleaved, so both see the same machine. Peak memory is measured for each model
alone afterwards: its weights plus the peak of one step above what was allocated before.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from vidpar.benchmarks.common import (
    Common,
    check_choices,
    format_bytes,
    format_seconds,
    format_table,
    interleaved_runs,
    peak_bytes,
    summarise_speedup,
    torch_dtype,
    use_layout,
)
from vidpar.models.testing import TINY_WAN

PASSES = ("forward", "backward")
#: Wan2.1-T2V-1.3B's transformer.
GPU_MODEL = {
    "num_attention_heads": 12,
    "attention_head_dim": 128,
    "ffn_dim": 8960,
    "num_layers": 30,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 4096,
    "freq_dim": 256,
}
GPU_LATENT = [21, 60, 104]
GPU_TEXT = 512
#: A tiny Wan for CPU runs (the suite's own check): the tiny Wan vidpar's tests use.
CPU_MODEL = TINY_WAN
CPU_LATENT = [3, 8, 8]
CPU_TEXT = 8


@dataclass
class ModelsOptions:
    """``model``: ``WanTransformer3DModel`` config fields over the device's default
    (:data:`GPU_MODEL` on CUDA, :data:`CPU_MODEL` on CPU); ``latent``: ``[T, H, W]``
    (patch 1×2×2); ``text``: text tokens; ``checkpointing``: diffusers' gradient
    checkpointing in the backward pass (``None``: on for CUDA); ``compile``: regional
    compilation of both models' blocks."""

    passes: list[str] = field(default_factory=lambda: list(PASSES))
    model: dict[str, Any] = field(default_factory=dict)
    latent: list[int] | None = None
    text: int | None = None
    batch: int = 1
    dtype: str | None = None
    checkpointing: bool | None = None
    compile: bool = False


def resolved(options: ModelsOptions, common: Common) -> dict[str, Any]:
    """Sizes, dtype and passes of this run, checked."""
    model = {**(GPU_MODEL if common.cuda else CPU_MODEL), **(options.model or {})}
    latent = list(options.latent or (GPU_LATENT if common.cuda else CPU_LATENT))
    if len(latent) != 3 or latent[1] % 2 or latent[2] % 2:
        raise ValueError(f"models.latent must be [T, H, W] with even H and W, got {latent}")
    check_choices("pass", options.passes, PASSES)
    return {**wan_run(options, common, model, latent, CPU_TEXT), "compile": options.compile}


def wan_run(
    options: Any, common: Common, model: dict[str, Any], latent: list[int], cpu_text: int
) -> dict[str, Any]:
    """What a one-device run at Wan's patch (1 × 2 × 2) measures, from the suite's
    options: bf16 with activation checkpointing and Wan's 512 text tokens on CUDA."""
    return {
        "model": model,
        "latent": latent,
        "tokens": latent[0] * (latent[1] // 2) * (latent[2] // 2),
        "text": options.text or (GPU_TEXT if common.cuda else cpu_text),
        "batch": options.batch,
        "dtype": options.dtype or ("bfloat16" if common.cuda else "float32"),
        "passes": list(options.passes),
        "checkpointing": common.cuda if options.checkpointing is None else options.checkpointing,
    }


def cast_like_from_pretrained(model, dtype: torch.dtype) -> None:
    """Parameters and buffers in ``dtype``, except those diffusers keeps in float32 when it
    loads the model with ``torch_dtype`` (``_keep_in_fp32_modules``: Wan's rope, time
    embedder, modulation tables and block norms)."""
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    for prefix, module in model.named_modules():
        tensors = {**dict(module.named_parameters(recurse=False)), **module._buffers}
        for name, tensor in tensors.items():
            if tensor is not None and tensor.is_floating_point():
                kept = keep.intersection(f"{prefix}.{name}".split("."))
                tensor.data = tensor.data.to(torch.float32 if kept else dtype)


def _step(model, inputs: dict[str, torch.Tensor], backward: bool) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    with torch.set_grad_enabled(backward):
        out = model(**inputs, return_dict=False)[0]
        if backward:
            out.float().square().mean().backward()
    return out


def _measure(worker, size: dict[str, Any], common: Common) -> dict[str, Any]:
    """In the worker: interleaved plain-diffusers and vidpar iterations, then memory."""
    from diffusers import WanTransformer3DModel

    from vidpar.distributed.state import get_world_group
    from vidpar.models import parallelize

    use_layout()
    device, dtype = worker.device, torch_dtype(size["dtype"])
    torch.manual_seed(0)
    with torch.device(device):
        plain = WanTransformer3DModel(**size["model"])
    cast_like_from_pretrained(plain, dtype)
    ours = parallelize(copy.deepcopy(plain), compile=size["compile"])
    if size["compile"]:
        plain.compile_repeated_blocks()
    if size["checkpointing"]:
        plain.enable_gradient_checkpointing()
        ours.enable_gradient_checkpointing()
    gen = torch.Generator().manual_seed(1)
    b, channels = size["batch"], size["model"]["in_channels"]
    inputs = {
        "hidden_states": torch.randn((b, channels, *size["latent"]), generator=gen),
        "timestep": torch.full((b,), 500.0),
        "encoder_hidden_states": torch.randn(
            b, size["text"], size["model"]["text_dim"], generator=gen
        ),
    }
    inputs = {k: v.to(device=device, dtype=dtype) for k, v in inputs.items()}
    world = get_world_group()
    out: dict[str, Any] = {}
    for pass_name in size["passes"]:
        backward = pass_name == "backward"
        out[pass_name] = interleaved_runs(
            lambda backward=backward: _step(plain, inputs, backward),
            lambda backward=backward: _step(ours, inputs, backward),
            world,
            device,
            common,
        )
        out[f"{pass_name}_peak_bytes"] = {
            "single": peak_bytes(plain, lambda m=plain, b=backward: _step(m, inputs, b), device),
            "parallel": peak_bytes(ours, lambda m=ours, b=backward: _step(m, inputs, b), device),
        }
    with torch.no_grad():
        expect, got = _step(plain, inputs, False).float(), _step(ours, inputs, False).float()
    out["max_abs_diff"] = float((got - expect).abs().max())
    out["max_abs_ref"] = float(expect.abs().max())
    return out


def run(options: ModelsOptions, common: Common) -> dict[str, Any]:
    """Plain diffusers against ``parallelize`` at world 1."""
    from vidpar.config import ParallelConfig
    from vidpar.executor import Executor

    size = resolved(options, common)
    with Executor(ParallelConfig(), devices=common.device) as ex:
        (measured,) = ex.collective_rpc(_measure, size, common)
    row = summarise_speedup([measured], size["passes"], {"mode": "wan", "world": 1})
    for pass_name in size["passes"]:
        m = row[pass_name]
        m["peak_bytes"] = measured[f"{pass_name}_peak_bytes"]
        # vidpar's time over diffusers' (speedup is diffusers' over vidpar's): 1.02 = 2 % slower
        m["time_ratio"] = 1 / m["speedup"] if m["speedup"] else math.nan
    return {
        "size": {k: v for k, v in size.items() if k != "passes"},
        "results": [row],
        "notes": [
            "time ratio = vidpar time / diffusers time, the median over runs of each run's"
            " ratio (1.02 = vidpar 2 % slower); both models in one worker, interleaved",
            "peak = the model's weights + the peak of one step above what was allocated"
            " before it (each model measured alone, gradients already allocated)",
            "backward = forward + backward of mean(out²)"
            + (", with diffusers' gradient checkpointing" if size["checkpointing"] else ""),
        ],
    }


def table(report: dict[str, Any]) -> str:
    size = report["size"]
    model = size["model"]
    head = (
        f"models: WanTransformer3DModel, {model['num_attention_heads']} heads × "
        f"{model['attention_head_dim']}, {model['num_layers']} layers, latent {size['latent']}"
        f" -> {size['tokens']} tokens, {size['text']} text tokens, batch {size['batch']}, "
        f"{size['dtype']}{', gradient checkpointing' if size['checkpointing'] else ''}"
        f"{', compiled' if size['compile'] else ''}\n"
    )
    rows = []
    for r in report["results"]:
        for pass_name in ("forward", "backward"):
            if pass_name not in r:
                continue
            m = r[pass_name]
            peaks = m["peak_bytes"]
            rows.append(
                {
                    "pass": "fwd" if pass_name == "forward" else "fwd+bwd",
                    "diffusers": format_seconds(m["single"]["median_s"]),
                    "vidpar": format_seconds(m["parallel"]["median_s"]),
                    "ratio": f"{m['time_ratio']:.3f}x",
                    "peak_d": "-" if peaks["single"] is None else format_bytes(peaks["single"]),
                    "peak_v": "-" if peaks["parallel"] is None else format_bytes(peaks["parallel"]),
                    "diff": f"{r['max_abs_diff']:.1e}",
                }
            )
    columns = [
        ("pass", "pass"),
        ("diffusers", "diffusers"),
        ("vidpar", "vidpar world 1"),
        ("ratio", "time ratio"),
        ("peak_d", "peak diffusers"),
        ("peak_v", "peak vidpar"),
        ("diff", "max |diff|"),
    ]
    return head + format_table(rows, columns)
