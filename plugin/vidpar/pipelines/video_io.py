"""Turning generated videos into files people can watch: ``.mp4`` (H.264 through PyAV)
and ``.gif`` (Pillow), picked by the file's extension."""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

#: Extensions :func:`write_video` and :func:`read_video` understand.
VIDEO_EXTENSIONS: tuple[str, ...] = (".mp4", ".gif")
#: With ``upscale=None``, tiny videos are enlarged until their short side reaches this.
MIN_SIDE = 128


def to_uint8_frames(video: torch.Tensor | np.ndarray) -> np.ndarray:
    """``[C, T, H, W]`` in ``[-1, 1]`` (C is 3, or 1 for grey) to ``[T, H, W, 3]`` uint8.

    Values outside ``[-1, 1]`` are clipped.
    """
    v = torch.as_tensor(video).detach()
    if v.dim() != 4 or v.shape[0] not in (1, 3):
        raise ValueError(f"expected a video [C, T, H, W] with C = 1 or 3, got {tuple(v.shape)}")
    v = v.to("cpu", torch.float32).clamp(-1.0, 1.0)
    v = ((v + 1.0) * 127.5).round().to(torch.uint8)
    if v.shape[0] == 1:
        v = v.expand(3, -1, -1, -1)
    return v.permute(1, 2, 3, 0).contiguous().numpy()


def _check_extension(path: Path) -> str:
    ext = path.suffix.lower()
    if ext not in VIDEO_EXTENSIONS:
        raise ValueError(
            f"cannot tell the video format of {str(path)!r}: the extension must be one of "
            f"{', '.join(VIDEO_EXTENSIONS)}, got {ext or 'none'!r}"
        )
    return ext


def _as_frames(frames: torch.Tensor | np.ndarray) -> np.ndarray:
    """uint8 ``[T, H, W, 3]`` frames as they are, or a ``[C, T, H, W]`` video converted."""
    if isinstance(frames, torch.Tensor) or np.asarray(frames).dtype != np.uint8:
        return to_uint8_frames(frames)
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames [T, H, W, 3], got {frames.shape}")
    return frames


def auto_upscale(height: int, width: int, min_side: int = MIN_SIDE) -> int:
    """The smallest integer factor that brings the short side to ``min_side`` (at least 1)."""
    return max(1, math.ceil(min_side / min(height, width)))


def write_video(
    path: str | Path,
    frames: torch.Tensor | np.ndarray,
    fps: int = 8,
    upscale: int | None = None,
    quality: int = 12,
) -> Path:
    """Write a video to ``path``; the extension (``.mp4`` or ``.gif``) picks the format.

    ``frames`` is uint8 ``[T, H, W, 3]`` or a ``[C, T, H, W]`` tensor in ``[-1, 1]``.
    Frames are enlarged ``upscale`` times with nearest-neighbour (``None``: enough for a
    short side of :data:`MIN_SIDE` pixels). H.264 in yuv420p needs even sizes, so an odd
    ``.mp4`` size is padded by repeating the last row or column. ``quality`` is the x264
    CRF (lower is better; 0 is lossless in luma). Returns the path written.
    """
    path = Path(path)
    ext = _check_extension(path)
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    frames = _as_frames(frames)
    if len(frames) == 0:
        raise ValueError("cannot write a video with no frames")
    factor = auto_upscale(*frames.shape[1:3]) if upscale is None else upscale
    if factor < 1:
        raise ValueError(f"upscale must be a positive integer, got {upscale}")
    if factor > 1:
        frames = frames.repeat(factor, axis=1).repeat(factor, axis=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    if ext == ".mp4":
        _write_mp4(path, frames, fps, quality)
    else:
        _write_gif(path, frames, fps)
    return path


def _write_mp4(path: Path, frames: np.ndarray, fps: int, crf: int) -> None:
    import av

    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf), "preset": "medium"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _write_gif(path: Path, frames: np.ndarray, fps: int) -> None:
    from PIL import Image

    images = [Image.fromarray(f) for f in frames]
    # Pillow merges identical consecutive frames into one longer frame.
    images[0].save(
        path,
        save_all=True,
        append_images=images[1:],
        duration=round(1000 / fps),
        loop=0,
        optimize=False,
    )


def read_video(path: str | Path) -> np.ndarray:
    """Every frame of an ``.mp4`` or ``.gif`` file as uint8 ``[T, H, W, 3]``."""
    path = Path(path)
    ext = _check_extension(path)
    if not path.is_file():
        raise FileNotFoundError(f"no video at {str(path)!r}")
    if ext == ".mp4":
        import av

        with av.open(str(path)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    else:
        from PIL import Image, ImageSequence

        with Image.open(path) as image:
            frames = [np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(image)]
    return np.stack(frames)
