"""GPU benchmark (not run in the suite): each stage of one prompt-to-video generation —
encode the prompt, denoise, decode — at the published Wan2.1-T2V-1.3B configs with random
weights (UMT5-XXL text encoder, the 1.3B transformer, Wan2.1's VAE at 81 × 480 × 832),
vidpar's DiffusersPipelineGenerator on the layouts given against diffusers' own WanPipeline
on one GPU.

    python benchmarks/pipeline_stages.py --root /tmp/wan-random --layouts single,sp2,cfg2 --steps 10
    python benchmarks/pipeline_stages.py --tiny --root /tmp/tiny-wan --layouts single,sp2 --steps 2

``--tiny`` is a CPU dry run of the same code on vidpar's tiny pipeline folder (float32,
5 × 16 × 16), so that a GPU session does not fail on a bug.

Besides the stages it prints where the whole ``generate`` call's time goes, on the caller's
and rank 0's clocks (one system-wide clock, :func:`time.perf_counter`): request sent →
decoded by the worker → each stage → reply encoded → reply decoded → numpy handed back
(median of the runs, in ms, also in the JSON as each run's ``timeline``); and, at world 1,
one transformer forward of vidpar's parallelised model against the same weights in plain
diffusers, in the worker, taking turns (``forward``: is the denoise gap in the model?).

The first run writes the random-weight pipeline folder under ``--root`` (about 12 GB in
bf16; nothing is downloaded: the tokenizer is vidpar's tiny word-level one, and every
prompt is padded to 512 tokens as Wan pads it, so the encoder's work is the real one).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import time
from pathlib import Path
from typing import Any

import torch

#: google/umt5-xxl's encoder, as Wan2.1 ships it.
UMT5_XXL = {
    "vocab_size": 256384,
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_heads": 64,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "feed_forward_proj": "gated-gelu",
    "pad_token_id": 0,
    "eos_token_id": 1,
    "decoder_start_token_id": 0,
}
#: Wan2.1-T2V-1.3B's transformer.
WAN_1P3B = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 12,
    "attention_head_dim": 128,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 4096,
    "freq_dim": 256,
    "ffn_dim": 8960,
    "num_layers": 30,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "rope_max_seq_len": 1024,
}
VIDEO = {"num_frames": 81, "height": 480, "width": 832}
TINY_VIDEO = {"num_frames": 5, "height": 16, "width": 16}
PROMPT = "a red fox running through snow"
PRESETS = {"single": {}, "sp2": {"ulysses": 2}, "cfg2": {"cfg": 2}, "tp2": {"tp": 2}}


def write_folder(root: Path, tiny: bool = False) -> Path:
    """The random-weight Wan2.1-T2V-1.3B pipeline folder (written once), or the tiny one.
    The big models are built on the GPU directly, in bf16 (no float32 copy, no CPU init)."""
    from diffusers import (
        AutoencoderKLWan,
        UniPCMultistepScheduler,
        WanPipeline,
        WanTransformer3DModel,
    )
    from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

    from vidpar.models.testing import make_tiny_tokenizer, make_tiny_wan_pipeline

    if (root / "model_index.json").is_file():
        return root
    if tiny:
        return make_tiny_wan_pipeline(root)
    make_tiny_tokenizer(root / "tokenizer")
    default_dtype = torch.get_default_dtype()
    with torch.device("cuda"):
        torch.manual_seed(0)
        torch.set_default_dtype(torch.bfloat16)
        try:
            text_encoder = UMT5EncoderModel(UMT5Config(**UMT5_XXL))
            transformer = WanTransformer3DModel(**WAN_1P3B)
        finally:
            torch.set_default_dtype(default_dtype)
        pipe = WanPipeline(
            tokenizer=AutoTokenizer.from_pretrained(str(root / "tokenizer")),
            text_encoder=text_encoder,
            vae=AutoencoderKLWan(),
            scheduler=UniPCMultistepScheduler(
                prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
            ),
            transformer=transformer,
        )
    pipe.save_pretrained(str(root))
    del pipe, text_encoder, transformer
    torch.cuda.empty_cache()
    return root


STAGES = ("encode_prompt", "denoise", "decode")


def _stage(fn, device: torch.device, seconds: dict, peaks: dict, name: str):
    """Run ``fn`` as stage ``name``: its seconds (the GPU waited for) and, on CUDA, its peak
    GiB of allocated memory."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    out = fn()
    if cuda:
        torch.cuda.synchronize()
        peaks[name] = torch.cuda.max_memory_allocated() / 2**30
    seconds[name] = time.perf_counter() - start
    return out


def diffusers_runs(
    folder: Path, steps: int, runs: int, device: torch.device, dtype: torch.dtype, video: dict
) -> list[dict]:
    """diffusers' WanPipeline on one device (VAE in float32, as its model card loads it):
    per run, each stage's seconds and peak GiB, and one whole ``pipe(prompt)`` call's
    seconds (``total``, frames out as ``output_type="np"``), after a warm-up call."""
    from diffusers import AutoencoderKLWan, WanPipeline

    vae = AutoencoderKLWan.from_pretrained(str(folder), subfolder="vae", torch_dtype=torch.float32)
    pipe = WanPipeline.from_pretrained(str(folder), vae=vae, torch_dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(shape).to(device)
    std = torch.tensor(vae.config.latents_std).view(shape).to(device)

    def whole() -> None:
        pipe(
            PROMPT,
            negative_prompt="",
            num_inference_steps=steps,
            output_type="np",
            generator=torch.Generator().manual_seed(0),
            **video,
        )

    whole()  # warm-up: kernels, allocator, cuDNN plans
    rows = []
    for _ in range(runs):
        seconds: dict[str, float] = {}
        peaks: dict[str, float] = {}
        cond, null = _stage(
            lambda: pipe.encode_prompt(PROMPT, "", max_sequence_length=512, device=device),
            device,
            seconds,
            peaks,
            "encode_prompt",
        )
        latents = _stage(
            lambda c=cond, n=null: (
                pipe(
                    prompt_embeds=c,
                    negative_prompt_embeds=n,
                    num_inference_steps=steps,
                    generator=torch.Generator().manual_seed(0),
                    output_type="latent",
                    **video,
                ).frames
            ),
            device,
            seconds,
            peaks,
            "denoise",
        )
        with torch.no_grad():
            _stage(
                lambda z=latents: vae.decode(z.float() * std + mean, return_dict=False)[0],
                device,
                seconds,
                peaks,
                "decode",
            )
        _stage(whole, device, seconds, peaks, "total")
        rows.append({"seconds": seconds, "peak_gib": peaks})
    return rows


def _forward_comparison(worker, video: dict, runs: int) -> dict[str, Any]:
    """One transformer forward of the worker's parallelised model against the same weights
    as plain diffusers (``load_pretrained``, no plan), on the same inputs, taking turns:
    each one's seconds per forward (median of ``runs`` after a warm-up)."""
    from vidpar.models.pretrained import load_pretrained

    spec = worker.pipeline_spec
    ours = worker.transformers["transformer"]
    plain = load_pretrained(spec.components["transformer"], device=worker.device, dtype=ours.dtype)
    plain.eval().requires_grad_(False)
    cfg = plain.config
    gen = torch.Generator().manual_seed(0)
    shape = (1, *spec.latent_shape(*video.values()))
    latents = torch.randn(shape, generator=gen).to(worker.device, ours.dtype)
    text = torch.randn((1, 512, cfg.text_dim), generator=gen).to(worker.device, ours.dtype)
    timestep = torch.tensor([500.0], device=worker.device)
    seconds: dict[str, list[float]] = {"vidpar": [], "diffusers": []}
    cuda = worker.device.type == "cuda"
    with torch.no_grad():
        for step in range(runs + 1):
            for label, model in (("vidpar", ours), ("diffusers", plain)):
                if cuda:
                    torch.cuda.synchronize(worker.device)
                start = time.perf_counter()
                model(latents, timestep, text, return_dict=False)
                if cuda:
                    torch.cuda.synchronize(worker.device)
                if step:
                    seconds[label].append(time.perf_counter() - start)
    del plain
    if cuda:
        torch.cuda.empty_cache()
    return {label: sorted(v)[len(v) // 2] for label, v in seconds.items()}


def vidpar_runs(
    folder: Path,
    layout: str,
    steps: int,
    runs: int,
    device: torch.device,
    dtype: torch.dtype,
    video: dict,
) -> tuple[list[dict], dict[str, Any] | None]:
    """vidpar's DiffusersPipelineGenerator on ``layout``: per run, rank 0's seconds and peak
    GiB per stage (``last_timings``/``last_peak_gib``), the whole ``generate`` call's
    seconds (frames out as numpy, like diffusers' ``output_type="np"``) and its time line
    (``last_timeline`` with rank 0's reply encode added), after a warm-up; and, at world 1,
    the transformer forward against plain diffusers (:func:`_forward_comparison`)."""
    from vidpar import ParallelConfig
    from vidpar.pipelines import DiffusersPipelineGenerator

    parallel = ParallelConfig(**PRESETS[layout])
    rows = []
    devices = "cpu" if device.type == "cpu" else "auto"
    with DiffusersPipelineGenerator(folder, parallel, dtype=dtype, devices=devices) as gen:
        gen.generate(PROMPT, steps=steps, seed=0, **video)  # warm-up
        for _ in range(runs):
            start = time.perf_counter()
            gen.generate(PROMPT, steps=steps, seed=0, **video)
            total = time.perf_counter() - start
            # rank 0's last encode is its reply's (µs off: the origin is this call's start)
            worker_wire = gen.executor.collective_rpc("wire_times", ranks=[0])[0]
            timeline = dict(gen.last_timeline)
            for key in ("encode_start", "encode_end"):
                timeline[f"reply_{key}"] = worker_wire[key] - start
            rows.append(
                {
                    "seconds": {**gen.last_timings, "total": total},
                    "peak_gib": dict(gen.last_peak_gib),
                    "timeline": dict(sorted(timeline.items(), key=lambda item: item[1])),
                }
            )
        forward = None
        if parallel.world_size == 1:
            forward = gen.executor.collective_rpc(_forward_comparison, video, runs)[0]
    return rows, forward


def print_breakdown(label: str, rows: list[dict]) -> dict[str, float]:
    """Each step of the whole call's time line, in the first run's order: the median over
    the runs of its ms since the previous event. Returns them."""
    order = list(rows[0]["timeline"])
    steps = {}
    for before, after in itertools.pairwise(order):
        gaps = sorted(r["timeline"][after] - r["timeline"][before] for r in rows)
        steps[f"{before} -> {after}"] = gaps[len(gaps) // 2]
    print(f"{label}: the whole call, step by step (caller and rank 0 on one clock; ms, median)")
    for name, seconds in steps.items():
        print(f"    {name:48} {seconds * 1e3:9.2f}")
    return steps


def _median(rows: list[dict], kind: str, stage: str) -> float:
    values = sorted(r[kind].get(stage, float("nan")) for r in rows)
    return values[len(values) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path("/tmp/wan2.1-t2v-1.3b-random"))
    parser.add_argument("--layouts", default="single")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="JSON of every run")
    parser.add_argument("--tiny", action="store_true", help="CPU dry run: the tiny folder")
    args = parser.parse_args()
    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    video = TINY_VIDEO if args.tiny else VIDEO
    folder = write_folder(args.root, args.tiny)
    results = {"diffusers": diffusers_runs(folder, args.steps, args.runs, device, dtype, video)}
    if device.type == "cuda":
        gc.collect()  # the diffusers pipeline is gone with its function: free its memory
        torch.cuda.empty_cache()
    forwards = {}
    for layout in args.layouts.split(","):
        rows, forward = vidpar_runs(folder, layout, args.steps, args.runs, device, dtype, video)
        results[f"vidpar {layout}"] = rows
        if forward is not None:
            forwards[f"vidpar {layout}"] = forward
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(
        f"{name}, torch {torch.__version__}, steps {args.steps}, median of {args.runs} runs; "
        "seconds (peak GiB) and ratio to diffusers"
    )
    base = results["diffusers"]
    for label, rows in results.items():
        cells = []
        for stage in (*STAGES, "total"):
            sec, ref = _median(rows, "seconds", stage), _median(base, "seconds", stage)
            peak = _median(rows, "peak_gib", stage)
            cells.append(f"{stage} {sec:.3f} s ({peak:.2f} GiB) {sec / ref:.3f}x")
        print(f"{label:20} | " + " | ".join(cells))
    breakdowns = {
        label: print_breakdown(label, rows)
        for label, rows in results.items()
        if label != "diffusers"
    }
    for label, forward in forwards.items():
        ratio = forward["vidpar"] / forward["diffusers"]
        print(
            f"{label}: one transformer forward, parallelised {forward['vidpar']:.4f} s vs plain "
            f"diffusers {forward['diffusers']:.4f} s = {ratio:.3f}x (same weights and inputs)"
        )
    if args.out is not None:
        payload = {"device": name, "torch": torch.__version__, "steps": args.steps}
        payload |= {"breakdown_s": breakdowns, "forward_s": forwards}
        args.out.write_text(json.dumps({**payload, "runs": results}, indent=1))


if __name__ == "__main__":
    main()
