"""GPU benchmark (not run in the suite): each stage of one prompt-to-video generation —
encode the prompt, denoise, decode — at the published Wan2.1-T2V-1.3B configs with random
weights (UMT5-XXL text encoder, the 1.3B transformer, Wan2.1's VAE at 81 × 480 × 832),
vidpar's DiffusersPipelineGenerator on the layouts given against diffusers' own WanPipeline
on one GPU.

    python benchmarks/pipeline_stages.py --root /tmp/wan-random --layouts single,sp2,cfg2 --steps 10

The first run writes the random-weight pipeline folder under ``--root`` (about 12 GB in
bf16; nothing is downloaded: the tokenizer is vidpar's tiny word-level one, and every
prompt is padded to 512 tokens as Wan pads it, so the encoder's work is the real one).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

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
PROMPT = "a red fox running through snow"
PRESETS = {"single": {}, "sp2": {"ulysses": 2}, "cfg2": {"cfg": 2}, "tp2": {"tp": 2}}


def write_folder(root: Path) -> Path:
    """The random-weight Wan2.1-T2V-1.3B pipeline folder (written once)."""
    from diffusers import (
        AutoencoderKLWan,
        UniPCMultistepScheduler,
        WanPipeline,
        WanTransformer3DModel,
    )
    from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

    from vidpar.models.testing import make_tiny_tokenizer

    if (root / "model_index.json").is_file():
        return root
    make_tiny_tokenizer(root / "tokenizer")
    with torch.device("cuda"):
        torch.manual_seed(0)
        pipe = WanPipeline(
            tokenizer=AutoTokenizer.from_pretrained(str(root / "tokenizer")),
            text_encoder=UMT5EncoderModel(UMT5Config(**UMT5_XXL)).to(torch.bfloat16),
            vae=AutoencoderKLWan(),
            scheduler=UniPCMultistepScheduler(
                prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
            ),
            transformer=WanTransformer3DModel(**WAN_1P3B).to(torch.bfloat16),
        )
    pipe.save_pretrained(str(root))
    del pipe
    torch.cuda.empty_cache()
    return root


STAGES = ("encode_prompt", "denoise", "decode")


def _stage(fn, seconds: dict, peaks: dict, name: str):
    """Run ``fn`` as stage ``name``: its seconds (the GPU waited for) and its peak GiB."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    seconds[name] = time.perf_counter() - start
    peaks[name] = torch.cuda.max_memory_allocated() / 2**30
    return out


def diffusers_runs(folder: Path, steps: int, runs: int) -> list[dict]:
    """diffusers' WanPipeline on one GPU (bf16, VAE in float32, as its model card loads it):
    per run, each stage's seconds and peak GiB, and one whole ``pipe(prompt)`` call's
    seconds (``total``, frames out as ``output_type="np"``), after a warm-up call."""
    from diffusers import AutoencoderKLWan, WanPipeline

    vae = AutoencoderKLWan.from_pretrained(str(folder), subfolder="vae", torch_dtype=torch.float32)
    pipe = WanPipeline.from_pretrained(str(folder), vae=vae, torch_dtype=torch.bfloat16).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(shape).cuda()
    std = torch.tensor(vae.config.latents_std).view(shape).cuda()

    def whole() -> None:
        pipe(
            PROMPT,
            negative_prompt="",
            num_inference_steps=steps,
            output_type="np",
            generator=torch.Generator().manual_seed(0),
            **VIDEO,
        )

    whole()  # warm-up: kernels, allocator, cuDNN plans
    rows = []
    for _ in range(runs):
        seconds: dict[str, float] = {}
        peaks: dict[str, float] = {}
        cond, null = _stage(
            lambda: pipe.encode_prompt(PROMPT, "", max_sequence_length=512, device="cuda"),
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
                    **VIDEO,
                ).frames
            ),
            seconds,
            peaks,
            "denoise",
        )
        with torch.no_grad():
            _stage(
                lambda z=latents: vae.decode(z.float() * std + mean, return_dict=False)[0],
                seconds,
                peaks,
                "decode",
            )
        _stage(whole, seconds, peaks, "total")
        rows.append({"seconds": seconds, "peak_gib": peaks})
    return rows


def vidpar_runs(folder: Path, layout: str, steps: int, runs: int) -> list[dict]:
    """vidpar's DiffusersPipelineGenerator on ``layout``: per run, rank 0's seconds and peak
    GiB per stage (``last_timings``/``last_peak_gib``) and the whole ``generate`` call's
    seconds (frames out as numpy, like diffusers' ``output_type="np"``), after a warm-up."""
    from vidpar import ParallelConfig
    from vidpar.pipelines import DiffusersPipelineGenerator

    parallel = ParallelConfig(**PRESETS[layout])
    rows = []
    with DiffusersPipelineGenerator(folder, parallel, dtype=torch.bfloat16) as gen:
        gen.generate(PROMPT, steps=steps, seed=0, **VIDEO)  # warm-up
        for _ in range(runs):
            start = time.perf_counter()
            gen.generate(PROMPT, steps=steps, seed=0, **VIDEO)
            total = time.perf_counter() - start
            rows.append(
                {
                    "seconds": {**gen.last_timings, "total": total},
                    "peak_gib": dict(gen.last_peak_gib),
                }
            )
    return rows


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
    args = parser.parse_args()
    folder = write_folder(args.root)
    results = {"diffusers": diffusers_runs(folder, args.steps, args.runs)}
    torch.cuda.empty_cache()  # the diffusers pipeline is gone with its function
    for layout in args.layouts.split(","):
        results[f"vidpar {layout}"] = vidpar_runs(folder, layout, args.steps, args.runs)
    print(
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}, steps {args.steps}, "
        f"median of {args.runs} runs; seconds (peak GiB) and ratio to diffusers"
    )
    base = results["diffusers"]
    for name, rows in results.items():
        cells = []
        for stage in (*STAGES, "total"):
            sec, ref = _median(rows, "seconds", stage), _median(base, "seconds", stage)
            peak = _median(rows, "peak_gib", stage) if stage != "total" else float("nan")
            cells.append(f"{stage} {sec:.3f} s ({peak:.2f} GiB) {sec / ref:.3f}x")
        print(f"{name:20} | " + " | ".join(cells))
    if args.out is not None:
        args.out.write_text(
            json.dumps(
                {
                    "device": torch.cuda.get_device_name(),
                    "torch": torch.__version__,
                    "steps": args.steps,
                    "runs": results,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
