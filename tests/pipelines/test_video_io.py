"""Video files: tensor-to-frame conversion, mp4 and gif round trips, bad extensions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vidpar.data import MovingShapesDataset
from vidpar.pipelines import read_video, to_uint8_frames, write_video
from vidpar.pipelines.video_io import auto_upscale


def clip() -> torch.Tensor:
    return MovingShapesDataset(4, num_classes=8, seed=0)[1]["video"]


def test_to_uint8_frames_maps_the_range_and_layout():
    video = torch.zeros(3, 2, 4, 5)
    video[0, 0] = -1.0
    video[1, 0] = 1.0
    video[2, 1] = 7.0  # clipped
    video[0, 1, 0, 0] = -3.0  # clipped
    frames = to_uint8_frames(video)
    assert frames.shape == (2, 4, 5, 3) and frames.dtype == np.uint8
    assert (frames[0, ..., 0] == 0).all() and (frames[0, ..., 1] == 255).all()
    assert (frames[0, ..., 2] == 128).all()  # 0 -> 127.5, rounded
    assert (frames[1, ..., 2] == 255).all() and frames[1, 0, 0, 0] == 0
    grey = to_uint8_frames(torch.full((1, 3, 2, 2), 1.0))
    assert grey.shape == (3, 2, 2, 3) and (grey == 255).all()
    with pytest.raises(ValueError, match="expected a video"):
        to_uint8_frames(torch.zeros(2, 3, 4, 4))
    with pytest.raises(ValueError, match="expected a video"):
        to_uint8_frames(torch.zeros(1, 3, 3, 4, 4))


def test_auto_upscale():
    assert auto_upscale(16, 16) == 8
    assert auto_upscale(16, 40) == 8
    assert auto_upscale(20, 20) == 7
    assert auto_upscale(512, 512) == 1


def nearest(frames: np.ndarray, factor: int) -> np.ndarray:
    return frames.repeat(factor, axis=1).repeat(factor, axis=2)


def test_mp4_round_trip(tmp_path):
    video = clip()
    frames = to_uint8_frames(video)
    path = write_video(tmp_path / "sub" / "clip.mp4", video, fps=8)  # tensor in, auto ×8
    assert path.is_file() and path.stat().st_size > 0
    back = read_video(path)
    assert back.shape == (8, 128, 128, 3) and back.dtype == np.uint8
    error = np.abs(back.astype(np.int16) - nearest(frames, 8)).astype(np.float64)
    assert error.mean() < 4 and np.percentile(error, 99) < 40
    # The decoded frames still move: frame 0 and frame 7 differ.
    assert np.abs(back[0].astype(np.int16) - back[7]).mean() > 2


def test_mp4_pads_odd_sizes(tmp_path):
    # Smooth colours (chroma is subsampled): red ramps along x, green along y, blue with t.
    t, y, x = torch.meshgrid(
        torch.linspace(-1, 1, 3), torch.linspace(-1, 1, 9), torch.linspace(-1, 1, 15), indexing="ij"
    )
    frames = to_uint8_frames(torch.stack([x, y, t]))
    back = read_video(write_video(tmp_path / "odd.mp4", frames, upscale=1, quality=0))
    assert back.shape == (3, 10, 16, 3)
    error = np.abs(back[:, :9, :15].astype(np.int16) - frames)
    assert error.mean() < 10  # 4:2:0 chroma on a 9 × 15 frame
    assert np.abs(back[:, :9, :15].astype(np.int16) - frames[::-1]).mean() > 50


def test_gif_round_trip(tmp_path):
    frames = to_uint8_frames(clip())
    path = write_video(tmp_path / "clip.GIF", frames, fps=4, upscale=3)
    back = read_video(path)
    assert back.shape == (8, 48, 48, 3)
    error = np.abs(back.astype(np.int16) - nearest(frames, 3))
    assert error.mean() < 2 and error.max() < 40


def test_bad_extension_and_missing_file(tmp_path):
    frames = to_uint8_frames(clip())
    for name in ("clip.avi", "clip"):
        with pytest.raises(ValueError, match=r"\.mp4, \.gif"):
            write_video(tmp_path / name, frames)
        assert not (tmp_path / name).exists()
    with pytest.raises(ValueError, match=r"\.mp4, \.gif"):
        read_video(tmp_path / "clip.webm")
    with pytest.raises(FileNotFoundError):
        read_video(tmp_path / "absent.mp4")
    with pytest.raises(ValueError, match="upscale"):
        write_video(tmp_path / "clip.gif", frames, upscale=0)
    with pytest.raises(ValueError, match="expected uint8 frames"):
        write_video(tmp_path / "clip.gif", frames[..., :2])
