"""Returning a generation's frames from a worker to the caller (issue #30): a decoded video
``[1, 3, 81, 480, 832]`` (388 MB of float32 frames) made into diffusers' ``np`` frames in
an Executor worker and handed back, before and after the frames were written straight into
shared memory, against diffusers' own postprocess in the caller's process.

    python benchmarks/frames_return.py --runs 7                 # CPU worker
    python benchmarks/frames_return.py --device cuda --runs 7   # the video on the GPU

Rows, each the median of ``--runs`` calls after one warm-up, seconds on the caller's clock:

* ``diffusers in process``: ``VideoProcessor.postprocess_video(video, "np")`` where the video
  is (what ``WanPipeline`` pays; no process boundary);
* ``before``: the worker runs that postprocess and returns the array, which the wire copies
  into a memfd of the message's own (one more copy) and the caller maps;
* ``after``: the worker's :func:`~vidpar.pipelines.pipeline_frames.frames_in_shared_memory`
  (one copy into a shared buffer) and the wire passes that memory itself.

On CUDA a fourth row tries the shared buffer page-locked for the copy
(``cudaHostRegister``; not what vidpar does).

``+ first read`` adds touching every page of the frames once in the caller (the page
faults a consumer pays on memory mapped from another process).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

SHAPE = (1, 3, 81, 480, 832)


def _make_video(worker, shape: tuple[int, ...]) -> None:
    """The decoded video, kept on the worker (its making is not timed)."""
    gen = torch.Generator().manual_seed(0)
    worker.video = (torch.rand(shape, generator=gen) * 2 - 1).to(worker.device)


def _postprocess(video: torch.Tensor) -> np.ndarray:
    from diffusers.video_processor import VideoProcessor

    return VideoProcessor(vae_scale_factor=8).postprocess_video(video, output_type="np")


def _frames_before(worker) -> np.ndarray:
    return _postprocess(worker.video)


def _frames_after(worker) -> np.ndarray:
    from vidpar.pipelines.pipeline_frames import frames_in_shared_memory

    return frames_in_shared_memory(worker.video)


def _frames_after_pinned(worker) -> np.ndarray:
    """A trial (CUDA only): ``frames_in_shared_memory`` with the shared buffer page-locked
    (``cudaHostRegister``) for its device-to-host copy, so that the copy is one DMA: does
    pinning 388 MB cost less than it saves?"""
    from vidpar.executor.shared_buffers import shared_empty

    video = worker.video
    out = shared_empty(video.shape, torch.float32)
    cudart = torch.cuda.cudart()
    assert int(cudart.cudaHostRegister(out.data_ptr(), out.numel() * 4, 0)) == 0
    try:
        out.copy_(video.mul(0.5).add_(0.5).clamp_(0, 1))
    finally:
        cudart.cudaHostUnregister(out.data_ptr())
    return out.numpy().transpose(0, 2, 3, 4, 1)


def _first_read(frames: np.ndarray) -> None:
    """Touch one float of every 4 KiB page, in memory order (diffusers' frames are a
    permuted view of ``[B, 3, F, H, W]`` memory; vidpar's are C-contiguous)."""
    in_memory_order = frames.transpose(np.argsort(frames.strides)[::-1])
    float(in_memory_order.reshape(-1)[::1024].sum())


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def measure(device: str, runs: int, shape: tuple[int, ...]) -> dict[str, Any]:
    from vidpar import ParallelConfig
    from vidpar.executor import Executor

    rows: dict[str, list[float]] = {}
    with Executor(ParallelConfig(), devices=[device] if device == "cpu" else "auto") as ex:
        ex.collective_rpc(_make_video, shape)
        local = (torch.rand(shape) * 2 - 1).to(device)
        paths = {
            "diffusers in process": lambda: _postprocess(local),
            "before (postprocess, wire copies)": lambda: ex.collective_rpc(_frames_before)[0],
            "after (shared buffer)": lambda: ex.collective_rpc(_frames_after)[0],
        }
        if device == "cuda":
            paths["trial: after, buffer pinned"] = lambda: ex.collective_rpc(_frames_after_pinned)[
                0
            ]
        expected = (*shape[:1], *shape[2:], 3)
        for label, call in list(paths.items()):  # warm-up
            try:
                assert call().shape == expected
            except Exception as exc:  # only a trial may fail: the rest is vidpar's own
                if not label.startswith("trial"):
                    raise
                print(f"{label}: left out ({exc!r})")
                del paths[label]
        for _ in range(runs):  # the paths take turns, so the load's drift hits each alike
            for label, call in paths.items():
                start = time.perf_counter()
                frames = call()
                returned = time.perf_counter()
                _first_read(frames)
                read = time.perf_counter()
                del frames
                rows.setdefault(label, []).append(returned - start)
                rows.setdefault(f"{label} + first read", []).append(read - start)
    return {label: {"median_s": _median(v), "runs_s": v} for label, v in rows.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--tiny", action="store_true", help="a 1 × 3 × 5 × 16 × 16 video")
    parser.add_argument("--out", type=Path, default=None, help="JSON of every run")
    args = parser.parse_args()
    shape = (1, 3, 5, 16, 16) if args.tiny else SHAPE
    results = measure(args.device, args.runs, shape)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    nbytes = int(np.prod(shape)) * 4
    print(
        f"{name}, torch {torch.__version__}, {nbytes / 1e6:.0f} MB of frames, median of {args.runs}"
    )
    base = results["diffusers in process"]["median_s"]
    for label, row in results.items():
        print(f"{label:45} {row['median_s'] * 1e3:9.1f} ms  {row['median_s'] / base:6.2f}x")
    if args.out is not None:
        payload = {"device": name, "torch": torch.__version__, "shape": shape, "runs": results}
        args.out.write_text(json.dumps(payload, indent=1))


if __name__ == "__main__":
    main()
