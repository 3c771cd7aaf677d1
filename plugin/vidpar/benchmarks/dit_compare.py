"""``dit`` with ``compare=wan``: one device, vidpar's VideoDiT eager and compiled
(regional: one compiled block for all) against diffusers' ``WanTransformer3DModel`` of the
same sizes, eager and with ``compile_repeated_blocks(fullgraph=True)``, in one run.

On CUDA the models are Wan2.1-1.3B-sized (hidden 1536, 12 × 128 heads, FFN 8960, 30
blocks, 4096-wide text: the same 1.42 B parameters) at 480p × 81 frames (latent
``[21, 60, 104]``, 32,760 tokens) with 512 text tokens, bf16 (Wan with the modules
diffusers keeps in float32, as ``from_pretrained(torch_dtype=...)`` loads it); forward,
and forward + backward with activation checkpointing (vidpar's compiled model also with
``activation_checkpointing="keep_attention"``). All variants live in one Executor
worker; per run, each variant's iterations follow the others', so all see the same
machine. Without diffusers only vidpar's variants run.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Any

import torch

from vidpar.benchmarks import models
from vidpar.benchmarks.common import (
    Common,
    IterationTimer,
    format_bytes,
    format_seconds,
    format_table,
    paired_ratio,
    peak_bytes,
    run_stats,
    synchronize,
    torch_dtype,
    use_layout,
)
from vidpar.benchmarks.models import GPU_LATENT, cast_like_from_pretrained, wan_run

#: ``(model sizes, device, dtype, checkpointing) -> VideoDiT`` with seeded weights.
BuildDiT = Callable[[dict[str, Any], torch.device, torch.dtype, bool | str], torch.nn.Module]
VARIANTS = ("vidpar", "vidpar_compiled", "vidpar_compiled_keep_attention", "wan", "wan_compiled")
#: Measured in forward + backward only (their forward is ``vidpar_compiled``'s).
BACKWARD_ONLY = ("vidpar_compiled_keep_attention",)
#: ``(vidpar variant, the Wan variant it is compared with)``.
COMPARED = (
    ("vidpar", "wan"),
    ("vidpar_compiled", "wan_compiled"),
    ("vidpar_compiled_keep_attention", "wan_compiled"),
)


def video_dit_sizes(wan: dict[str, Any]) -> dict[str, Any]:
    """A ``WanTransformer3DModel`` config's sizes as VideoDiT fields (:func:`_wan` maps
    them back), so both models of a run hold the same parameters."""
    heads = wan["num_attention_heads"]
    return {
        "in_channels": wan["in_channels"],
        "hidden_size": heads * wan["attention_head_dim"],
        "num_heads": heads,
        "depth": wan["num_layers"],
        "ffn_dim": wan["ffn_dim"],
        "context_dim": wan["text_dim"],
    }


#: Wan2.1-T2V-1.3B as a VideoDiT conditioned on text (T5 embeddings).
GPU_MODEL = video_dit_sizes(models.GPU_MODEL)
#: A tiny pair for CPU runs (the suite's own check).
CPU_MODEL = video_dit_sizes(models.CPU_MODEL)
CPU_LATENT = [2, 8, 8]
CPU_TEXT = 8


def resolved(options: Any, common: Common) -> dict[str, Any]:
    """Sizes, dtype, passes and compile backend of this run (``options``: DiTOptions)."""
    from vidpar.nn.dit import DiTConfig

    model = {**(GPU_MODEL if common.cuda else CPU_MODEL), **(options.model or {})}
    model["num_classes"] = 0
    config = DiTConfig(**model)
    if config.patch_size != (1, 2, 2):
        raise ValueError("dit.compare=wan needs patch_size [1, 2, 2] (Wan's)")
    latent = list(options.latent or (GPU_LATENT if common.cuda else CPU_LATENT))
    if len(latent) != 3 or latent[1] % 2 or latent[2] % 2:
        raise ValueError(f"dit.latent must be [T, H, W] with even H and W, got {latent}")
    backend = options.compile_backend or ("inductor" if common.cuda else "aot_eager")
    return {**wan_run(options, common, model, latent, CPU_TEXT), "compile_backend": backend}


def forward_flop(size: dict[str, Any]) -> float:
    """Analytic matmul FLOPs of one forward (2 per multiply-add): per block the QKV, output,
    cross-attention and FFN projections and both attentions' two matmuls, plus the text,
    time, patch and output projections."""
    m = size["model"]
    h, f, d, blocks = m["hidden_size"], m["ffn_dim"], m["context_dim"], m["depth"]
    n, text, batch = size["tokens"], size["text"], size["batch"]
    channels = m["in_channels"] * 4  # patch 1×2×2
    block = 2 * (
        6 * n * h * h + 2 * text * h * h + 2 * n * n * h + 2 * n * text * h + 2 * n * h * f
    )
    time_embedding = m.get("freq_dim", 256) * h + 7 * h * h  # + the shared Linear(h, 6h)
    rest = 2 * (text * (d * h + h * h) + 2 * n * channels * h + time_embedding)
    return float(batch * (blocks * block + rest))


def _wan(size: dict[str, Any], device: torch.device, dtype: torch.dtype):
    """diffusers' Wan of the same sizes (random weights), cast as ``from_pretrained``."""
    from diffusers import WanTransformer3DModel

    m = size["model"]
    with torch.device(device):
        wan = WanTransformer3DModel(
            num_attention_heads=m["num_heads"],
            attention_head_dim=m["hidden_size"] // m["num_heads"],
            ffn_dim=m["ffn_dim"],
            num_layers=m["depth"],
            in_channels=m["in_channels"],
            out_channels=m["in_channels"],
            text_dim=m["context_dim"],
        )
    cast_like_from_pretrained(wan, dtype)
    if size["checkpointing"]:
        wan.enable_gradient_checkpointing()
    return wan


def _variants(
    size: dict[str, Any], device: torch.device, dtype: torch.dtype, build_dit: BuildDiT
) -> dict[str, Any]:
    """``name -> (model, step(backward))``. vidpar's compiled variant is the same model
    with its compile switch on (the same weights)."""
    gen = torch.Generator().manual_seed(1)
    b, c = size["batch"], size["model"]["in_channels"]
    x = torch.randn((b, c, *size["latent"]), generator=gen).to(device=device, dtype=dtype)
    text = torch.randn((b, size["text"], size["model"]["context_dim"]), generator=gen)
    text = text.to(device=device, dtype=dtype)
    t = torch.full((b,), 0.5, device=device)
    ours = build_dit(size["model"], device, dtype, size["checkpointing"])

    def vidpar_step(compiled: bool, checkpointing: bool | str):
        def step(backward: bool) -> torch.Tensor:
            ours.config.compile = size["compile_backend"] if compiled else False
            ours.config.activation_checkpointing = checkpointing
            return _step(ours, (x, t, text), {}, backward)

        return step

    checkpointing = size["checkpointing"]
    variants = {
        "vidpar": (ours, vidpar_step(False, checkpointing)),
        "vidpar_compiled": (ours, vidpar_step(True, checkpointing)),
    }
    if checkpointing:
        keep = vidpar_step(True, "keep_attention")
        variants["vidpar_compiled_keep_attention"] = (ours, keep)
    try:
        wan = _wan(size, device, dtype)
    except ImportError:
        return variants
    wan_compiled = copy.deepcopy(wan)
    wan_compiled.compile_repeated_blocks(fullgraph=True, backend=size["compile_backend"])
    inputs = {"hidden_states": x, "timestep": t * 1000, "encoder_hidden_states": text}
    for name, model in (("wan", wan), ("wan_compiled", wan_compiled)):
        variants[name] = (model, lambda backward, m=model: _step(m, (), inputs, backward))
    return variants


def _step(model, args: tuple, kwargs: dict, backward: bool) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    with torch.set_grad_enabled(backward):
        out = model(*args, **kwargs)
        out = out if isinstance(out, torch.Tensor) else out[0]
        if backward:
            out.float().square().mean().backward()
    return out


def _measure(worker, size: dict[str, Any], common: Common, build_dit: BuildDiT) -> dict[str, Any]:
    """In the worker: every variant's first call (compilation), interleaved timed runs,
    then each variant's peak memory alone."""
    use_layout()
    device, dtype = worker.device, torch_dtype(size["dtype"])
    variants = _variants(size, device, dtype, build_dit)
    out: dict[str, Any] = {
        "params": {
            name: sum(p.numel() for p in m.parameters()) for name, (m, _) in variants.items()
        }
    }
    for pass_name in size["passes"]:
        backward = pass_name == "backward"
        measured = {n: v for n, v in variants.items() if backward or n not in BACKWARD_ONLY}
        first = {}
        for name, (_, step) in measured.items():
            synchronize(device)
            begin = time.perf_counter()
            step(backward)
            synchronize(device)
            first[name] = time.perf_counter() - begin
        times: dict[str, list[list[float]]] = {name: [] for name in measured}
        for _ in range(common.runs):
            for name, (_, step) in measured.items():
                for _ in range(common.warmup):
                    step(backward)
                timer = IterationTimer(device)
                for _ in range(common.repeats):
                    timer.time(lambda s=step, b=backward: s(b))
                times[name].append(timer.seconds())
        out[pass_name] = {
            name: {
                "times": times[name],
                "first_call_s": first[name],
                "peak_bytes": peak_bytes(model, lambda s=step, b=backward: s(b), device),
            }
            for name, (model, step) in measured.items()
        }
    with torch.no_grad():
        outputs = {name: step(False).float() for name, (_, step) in variants.items()}
    out["max_abs_diff"] = {
        f"{name}_compiled": float((outputs[f"{name}_compiled"] - outputs[name]).abs().max())
        for name in ("vidpar", "wan")
        if name in outputs
    }
    return out


def run(options: Any, common: Common, build_dit: BuildDiT) -> dict[str, Any]:
    """Every variant in one worker on one device; ``build_dit`` is the ``dit`` suite's
    seeded VideoDiT (:func:`vidpar.benchmarks.dit.build_dit`)."""
    from vidpar.config import ParallelConfig
    from vidpar.executor import Executor

    size = resolved(options, common)
    with Executor(ParallelConfig(), devices=common.device) as ex:
        (measured,) = ex.collective_rpc(_measure, size, common, build_dit)
    flop = forward_flop(size)
    results = []
    for pass_name in size["passes"]:
        work = flop * (3 if pass_name == "backward" else 1)
        row: dict[str, Any] = {"pass": pass_name, "tflop": work / 1e12}
        for name, m in measured[pass_name].items():
            stats = run_stats(m["times"])
            stats["tflops"] = work / stats["median_s"] / 1e12
            stats["first_call_s"] = m["first_call_s"]
            stats["compile_s"] = max(0.0, m["first_call_s"] - stats["median_s"])
            stats["peak_bytes"] = m["peak_bytes"]
            row[name] = stats
        for ours, theirs in COMPARED:
            if theirs in row and ours in row:  # speedup: diffusers' time over vidpar's, run by run
                medians = (row[theirs]["run_medians_s"], row[ours]["run_medians_s"])
                row[f"{ours}_speedup"] = paired_ratio(*medians)
        results.append(row)
    return {
        "compare": "wan",
        "size": {k: v for k, v in size.items() if k != "passes"},
        "params": measured["params"],
        "max_abs_diff": measured["max_abs_diff"],
        "results": results,
        "notes": [
            "speedup = diffusers' Wan time / vidpar's time (eager vs eager, compiled vs"
            " compiled), the median over runs of each run's ratio",
            "TFLOP/s = analytic matmul FLOPs / median time; fwd+bwd counts 3× the forward"
            " (the recomputation of activation checkpointing is not counted as work)",
            "compile = the first call's time - the median call's (tracing and code"
            " generation, once per pass)",
            "peak = the model's weights + the peak of one step above what was allocated"
            " before it (each variant alone, gradients already allocated)",
            "max |diff| compares each compiled variant's output with its eager one",
        ],
    }


def table(report: dict[str, Any]) -> str:
    size, m = report["size"], report["size"]["model"]
    head = (
        f"dit compare=wan: hidden {m['hidden_size']}, {m['num_heads']} heads, FFN "
        f"{m['ffn_dim']}, {m['depth']} blocks, latent {size['latent']} -> {size['tokens']} "
        f"tokens, {size['text']} text tokens, batch {size['batch']}, {size['dtype']}, "
        f"compile backend {size['compile_backend']}"
        f"{', activation checkpointing' if size['checkpointing'] else ''}\n"
    )
    rows = []
    for r in report["results"]:
        for name in VARIANTS:
            if name not in r:
                continue
            v = r[name]
            speedup = r.get(f"{name}_speedup")
            rows.append(
                {
                    "pass": "fwd" if r["pass"] == "forward" else "fwd+bwd",
                    "model": name,
                    "time": format_seconds(v["median_s"]),
                    "tflops": f"{v['tflops']:.1f}",
                    "peak": "-" if v["peak_bytes"] is None else format_bytes(v["peak_bytes"]),
                    "compile": format_seconds(v["compile_s"]) if "compiled" in name else "-",
                    "speedup": "-" if speedup is None else f"{speedup['ratio']:.3f}x",
                    "params": f"{report['params'][name] / 1e6:,.3f} M",
                }
            )
    columns = [
        ("pass", "pass"),
        ("model", "model"),
        ("time", "median"),
        ("tflops", "TFLOP/s"),
        ("peak", "peak"),
        ("compile", "compile"),
        ("speedup", "vs Wan"),
        ("params", "params"),
    ]
    return head + format_table(rows, columns)
