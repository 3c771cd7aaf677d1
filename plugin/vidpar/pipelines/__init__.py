"""Flow-matching training and sampling (with cfg parallelism) and video files.

``VideoGenerator`` (which needs the model and the executor) is imported lazily from
:mod:`vidpar.pipelines.generator`, ``export_weights`` and ``read_model_info`` from
:mod:`vidpar.pipelines.dit_weights`,
``DiffusersVideoGenerator`` from :mod:`vidpar.pipelines.diffusers_generator` and
``DiffusersPipelineGenerator`` from :mod:`vidpar.pipelines.pipeline_generator`.
"""

from __future__ import annotations

from typing import Any

from vidpar.pipelines.flow_matching import (
    FlowMatchEulerSampler,
    cfg_combine,
    flow_matching_loss,
    sample_timesteps,
    seeded_noise,
    shift_timesteps,
)
from vidpar.pipelines.video_io import read_video, to_uint8_frames, write_video

_LAZY_WEIGHTS = ("export_weights", "read_model_info")

__all__ = [
    "DiffusersPipelineGenerator",
    "DiffusersVideoGenerator",
    "FlowMatchEulerSampler",
    "VideoGenerator",
    "cfg_combine",
    "export_weights",
    "flow_matching_loss",
    "read_model_info",
    "read_video",
    "sample_timesteps",
    "seeded_noise",
    "shift_timesteps",
    "to_uint8_frames",
    "write_video",
]


def __getattr__(name: str) -> Any:
    if name == "DiffusersVideoGenerator":
        from vidpar.pipelines.diffusers_generator import DiffusersVideoGenerator

        return DiffusersVideoGenerator
    if name == "DiffusersPipelineGenerator":
        from vidpar.pipelines.pipeline_generator import DiffusersPipelineGenerator

        return DiffusersPipelineGenerator
    if name == "VideoGenerator":
        from vidpar.pipelines.generator import VideoGenerator

        return VideoGenerator
    if name in _LAZY_WEIGHTS:
        from vidpar.pipelines import dit_weights

        return getattr(dit_weights, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
