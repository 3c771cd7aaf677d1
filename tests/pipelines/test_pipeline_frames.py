"""The frames a generation hands back: diffusers' ``output_type="np"`` numbers, made with one
copy into shared memory, and the output files written from them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.video_processor import VideoProcessor

from vidpar.executor import shared_buffers, wire
from vidpar.pipelines.pipeline_frames import frames_in_shared_memory, write_output


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_frames_equal_diffusers_postprocess_and_live_in_shared_memory(dtype):
    videos = torch.randn(2, 3, 5, 32, 48, dtype=dtype, generator=torch.Generator().manual_seed(0))
    want = VideoProcessor(vae_scale_factor=8).postprocess_video(videos, output_type="np")
    frames = frames_in_shared_memory(videos)
    assert frames.dtype == np.float32 and frames.shape == (2, 5, 32, 48, 3)
    np.testing.assert_array_equal(frames, want)  # the same numbers, bit for bit
    assert frames.strides == want.strides  # diffusers' layout too
    memory = frames.transpose(0, 4, 1, 2, 3)  # [B, 3, F, H, W], as it lies in memory
    assert shared_buffers.shared_region(memoryview(memory).cast("B")) is not None
    frame, fds = wire.encode(wire.Reply(1, frames))  # the wire passes it as it is
    wire.close_all(fds)
    assert len(fds) == 1 and len(frame) < wire.OOB_MIN_BYTES


def test_output_files_hold_the_frames(tmp_path):
    frames = frames_in_shared_memory(torch.rand(2, 3, 5, 8, 8, dtype=torch.float64) * 2 - 1)
    np.testing.assert_array_equal(
        np.load(write_output(tmp_path / "one.npy", frames[:1], 16)), frames[0]
    )
    np.testing.assert_array_equal(np.load(write_output(tmp_path / "two.npy", frames, 16)), frames)
    assert write_output(tmp_path / "two.gif", frames, 8).stat().st_size > 0
