"""DiffusersPipelineGenerator: a tiny Wan pipeline folder in, a video out, on real gloo
worlds of every layout, against diffusers' own WanPipeline on the same folder and seed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import WanPipeline

from vidpar import ParallelConfig
from vidpar.models.testing import make_tiny_wan_pipeline
from vidpar.pipelines.pipeline_generator import DiffusersPipelineGenerator

PROMPTS = ["a red fox running through snow", "a blue bird over the river"]
NEGATIVE = "blurry"
#: 5 frames of 16 × 16 pixels: latents 3 × 8 × 8, 48 tokens with patch 1×2×2.
SETTINGS = {"num_frames": 5, "height": 16, "width": 16, "guidance_scale": 4.0}
STEPS, SEED = 3, 5


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_wan_pipeline(tmp_path_factory.mktemp("pipe") / "tiny-wan-pipeline")


@pytest.fixture(scope="module")
def expected(folder):
    """WanPipeline's videos of the folder, one process, float32: ``{n prompts: video}``."""
    pipe = WanPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    out = {}
    for n in (1, 2):
        out[n] = pipe(
            prompt=PROMPTS[:n],
            negative_prompt=NEGATIVE,
            num_inference_steps=STEPS,
            generator=torch.Generator().manual_seed(SEED),
            output_type="np",
            **SETTINGS,
        ).frames
    return out


LAYOUTS = {
    "single": ({}, 1),
    "sp2": ({"ulysses": 2}, 1),
    "ring2": ({"ring": 2}, 1),
    "tp2": ({"tp": 2}, 1),
    "cfg2": ({"cfg": 2}, 1),
    "ulysses2xring2": ({"ulysses": 2, "ring": 2}, 1),
    "dp2": ({"dp": 2}, 2),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_video_equals_wan_pipeline(name, folder, expected):
    sizes, prompts = LAYOUTS[name]
    with DiffusersPipelineGenerator(folder, ParallelConfig(**sizes), devices="cpu") as gen:
        video = gen.generate(
            PROMPTS[:prompts], NEGATIVE, steps=STEPS, seed=SEED, **SETTINGS
        )
    want = expected[prompts]
    assert video.shape == want.shape == (prompts, 5, 16, 16, 3)
    assert video.dtype == np.float32
    np.testing.assert_allclose(video, want, atol=2e-5)
