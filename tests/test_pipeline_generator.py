"""DiffusersPipelineGenerator: a tiny Wan pipeline folder in, a video out, on real gloo
worlds of every layout, against diffusers' own WanPipeline on the same folder and seed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import WanImageToVideoPipeline, WanPipeline
from PIL import Image

from vidpar import ParallelConfig
from vidpar.models.testing import make_tiny_wan_i2v_pipeline, make_tiny_wan_pipeline
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
        video = gen.generate(PROMPTS[:prompts], NEGATIVE, steps=STEPS, seed=SEED, **SETTINGS)
    want = expected[prompts]
    assert video.shape == want.shape == (prompts, 5, 16, 16, 3)
    assert video.dtype == np.float32
    np.testing.assert_allclose(video, want, atol=2e-5)


@pytest.fixture(scope="module")
def i2v_folder(tmp_path_factory):
    return make_tiny_wan_i2v_pipeline(tmp_path_factory.mktemp("i2v") / "tiny-wan-i2v-pipeline")


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    """A 20 × 24 picture (resized to the video's 16 × 16 and CLIP's 32 × 32 on the way)."""
    pixels = np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    path = tmp_path_factory.mktemp("image") / "first.png"
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture(scope="module")
def i2v_expected(i2v_folder, image_file):
    """WanImageToVideoPipeline's videos, one process: ``{n prompts: video}``. Its prompts go in
    as embeddings made by WanPipeline.encode_prompt (diffusers 0.42.1's I2V prompt cleaning
    calls ftfy even where it is not installed)."""
    pipe = WanImageToVideoPipeline.from_pretrained(str(i2v_folder))
    pipe.set_progress_bar_config(disable=True)
    texts = WanPipeline(pipe.tokenizer, pipe.text_encoder, pipe.vae, pipe.scheduler)
    out = {}
    for n in (1, 2):
        cond, null = texts.encode_prompt(
            PROMPTS[:n], [NEGATIVE] * n, max_sequence_length=512, device="cpu"
        )
        out[n] = pipe(
            image=Image.open(image_file),
            prompt_embeds=cond,
            negative_prompt_embeds=null,
            num_inference_steps=STEPS,
            generator=torch.Generator().manual_seed(SEED),
            output_type="np",
            **SETTINGS,
        ).frames
    return out


@pytest.mark.parametrize("name", ["single", "tp2", "ulysses2xring2", "cfg2", "dp2"])
def test_image_to_video_equals_wan_i2v_pipeline(name, i2v_folder, image_file, i2v_expected):
    sizes, prompts = LAYOUTS[name]
    with DiffusersPipelineGenerator(i2v_folder, ParallelConfig(**sizes), devices="cpu") as gen:
        video = gen.generate(
            PROMPTS[:prompts], NEGATIVE, image=image_file, steps=STEPS, seed=SEED, **SETTINGS
        )
    np.testing.assert_allclose(video, i2v_expected[prompts], atol=2e-5)
