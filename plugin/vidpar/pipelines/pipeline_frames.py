"""The frames a generation hands back: decoded videos made into diffusers' ``output_type="np"``
frames with their one device-to-host copy landing in shared memory, which the caller then
maps without a copy; or the videos written to the ``output=`` file where they were made."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from vidpar.executor.shared_buffers import shared_empty


def frames_in_shared_memory(videos: torch.Tensor) -> np.ndarray:
    """Videos ``[B, 3, F, H, W]`` in [-1, 1] (a VAE's decode) to float32 frames
    ``[B, F, H, W, 3]`` in [0, 1], the numbers diffusers' ``VideoProcessor.postprocess_video(
    videos, "np")`` gives (denormalised and clamped in the videos' dtype, then float32).

    The result is a :func:`~vidpar.executor.shared_buffers.shared_empty` buffer: returned from a
    worker, it reaches the caller as the same memory. It is written once: on a GPU the
    frames are made there and copied to it in one device-to-host copy; float32 frames on
    the CPU are computed in it. Its memory is ``[B, 3, F, H, W]`` and the array a permuted
    view of it, as diffusers' (whose postprocess copies the frames to the host, then once
    more to stack the videos; the wire then copied that into a memfd of its own)."""
    out = shared_empty(videos.shape, torch.float32)
    if videos.device.type == "cpu" and videos.dtype == torch.float32:
        torch.mul(videos, 0.5, out=out)
        out.add_(0.5).clamp_(0, 1)
    else:  # on the device, then to float32 (after the clamp, as diffusers) and the host
        out.copy_(videos.mul(0.5).add_(0.5).clamp_(0, 1))
    return out.numpy().transpose(0, 2, 3, 4, 1)


def write_output(path: str | os.PathLike, videos: np.ndarray, fps: int) -> Path:
    """``videos`` (float ``[B, F, H, W, 3]`` in [0, 1]) to ``.npy`` (``[F, H, W, 3]`` for
    one video, as diffusers' ``output_type="np"`` gives) or, side by side, ``.mp4``/``.gif``."""
    from vidpar.pipelines.video_io import write_video

    path = Path(path)
    if path.suffix == ".npy":
        np.save(path, videos[0] if len(videos) == 1 else videos)
    else:
        frames = (np.clip(videos, 0.0, 1.0) * 255).round().astype(np.uint8)
        write_video(path, np.concatenate(list(frames), axis=2), fps=fps)
    return path
