"""The compiled forward of diffusers' Wan2.1-1.3B-sized transformer at world 1, through
``vidpar.models.parallelize`` (inductor, bf16, regional compilation), timed; one JSON line
on stdout. Run it from two checkouts to see that a change leaves world 1 alone:

    PYTHONPATH=OLD/plugin python benchmarks/compiled_world1.py --label before
    PYTHONPATH=NEW/plugin python benchmarks/compiled_world1.py --label now
    python benchmarks/compiled_world1.py --summarize results.jsonl   # the ratio

It uses only what vidpar had before issue #32 (``vidpar.config.ParallelConfig``,
``vidpar.distributed.state.parallel_context``, ``vidpar.models.parallelize``), so the
older tree runs it unchanged. ``--tiny`` runs a tiny Wan on the CPU (a dry run).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from pipeline_stages import WAN_1P3B  # diffusers' Wan2.1-T2V-1.3B config

#: 81 frames at 480 × 832: latents [16, 21, 60, 104], 32,760 tokens; 512 text tokens.
LATENT, TEXT = (16, 21, 60, 104), 512
TINY = {
    **WAN_1P3B,
    "num_attention_heads": 2,
    "attention_head_dim": 16,
    "in_channels": 4,
    "out_channels": 4,
    "text_dim": 16,
    "freq_dim": 32,
    "ffn_dim": 64,
    "num_layers": 2,
    "rope_max_seq_len": 32,
}
TINY_LATENT, TINY_TEXT = (4, 3, 6, 6), 5


def measure(args: argparse.Namespace) -> dict:
    import torch
    import torch.distributed as dist
    from diffusers import WanTransformer3DModel

    import vidpar
    from vidpar.config import ParallelConfig
    from vidpar.distributed.state import parallel_context
    from vidpar.models import parallelize

    device = torch.device("cpu" if args.tiny else "cuda")
    config, latent, text = (TINY, TINY_LATENT, TINY_TEXT) if args.tiny else (WAN_1P3B, LATENT, TEXT)
    if args.layers:
        config = {**config, "num_layers": args.layers}
    dtype = torch.float32 if args.tiny else torch.bfloat16
    torch.manual_seed(0)
    with parallel_context(ParallelConfig(), store=dist.HashStore(), world_size=1, rank=0):
        with torch.device(device):
            model = WanTransformer3DModel(**config).to(dtype).eval()
        model = parallelize(model, compile=True)  # inductor, static shapes
        gen = torch.Generator(device).manual_seed(1)
        inputs = {
            "hidden_states": torch.randn(1, *latent, generator=gen, device=device, dtype=dtype),
            "timestep": torch.tensor([500.0], device=device),
            "encoder_hidden_states": torch.randn(
                1, text, config["text_dim"], generator=gen, device=device, dtype=dtype
            ),
        }

        def sync() -> None:
            if device.type == "cuda":
                torch.cuda.synchronize()

        with torch.no_grad():
            start = time.perf_counter()
            model(**inputs, return_dict=False)  # compiles
            sync()
            compile_s = time.perf_counter() - start
            for _ in range(args.warmup):
                model(**inputs, return_dict=False)
            runs = []
            for _ in range(args.runs):
                sync()
                start = time.perf_counter()
                for _ in range(args.calls):
                    model(**inputs, return_dict=False)
                sync()
                runs.append((time.perf_counter() - start) / args.calls * 1e3)
    return {
        "label": args.label,
        "tree": str(Path(vidpar.__file__).resolve().parents[1]),
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "dtype": str(dtype).removeprefix("torch."),
        "layers": config["num_layers"],
        "tokens": latent[1] * latent[2] * latent[3] // 4,
        "compile_s": round(compile_s, 2),
        "forward_ms_median": round(statistics.median(runs), 3),
        "runs_ms": [round(r, 3) for r in runs],
    }


def summarize(path: Path, before: str = "before", now: str = "now") -> dict:
    """The ratio ``now / before`` of the medians over all runs of each label (and per
    alternation, in file order) of a file of this script's JSON lines."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]
    by_label = {
        label: [r["forward_ms_median"] for r in rows if r["label"] == label]
        for label in (before, now)
    }
    if not all(by_label.values()):
        raise SystemExit(f"{path}: needs runs labelled {before!r} and {now!r}, got {by_label}")
    pairs = list(zip(by_label[before], by_label[now], strict=False))
    medians = {label: statistics.median(values) for label, values in by_label.items()}
    return {
        "forward_ms": medians,
        "ratio_now_over_before": round(medians[now] / medians[before], 4),
        "ratio_per_alternation": [round(b / a, 4) for a, b in pairs],
        "within_1_percent": medians[now] <= 1.01 * medians[before],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", default="now", help="names this tree in the JSON line")
    parser.add_argument("--tiny", action="store_true", help="a tiny Wan on the CPU (dry run)")
    parser.add_argument("--layers", type=int, help="fewer blocks than the model's 30")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5, help="timed runs (the median)")
    parser.add_argument("--calls", type=int, default=3, help="forwards per timed run")
    parser.add_argument("--summarize", type=Path, help="a JSON-lines file: print the ratio")
    args = parser.parse_args()
    result = summarize(args.summarize) if args.summarize else measure(args)
    print(json.dumps(result), flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
