"""DiffusersPipelineGenerator: a tiny Wan pipeline folder in, a video out, on real gloo
worlds of every layout, against diffusers' own WanPipeline on the same folder and seed."""

from __future__ import annotations

import os
import subprocess
import sys

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


def test_the_worker_writes_the_output_and_the_timeline_covers_the_call(
    folder, expected, tmp_path, monkeypatch
):
    with DiffusersPipelineGenerator(folder, devices="cpu") as gen:
        monkeypatch.chdir(tmp_path)  # after the workers started: a relative path is ours
        run = {"steps": STEPS, "seed": SEED, **SETTINGS}
        assert (
            gen.generate(PROMPTS[0], NEGATIVE, output="fox.npy", return_frames=False, **run) is None
        )
        np.testing.assert_allclose(np.load(tmp_path / "fox.npy"), expected[1][0], atol=2e-5)
        assert "write" in gen.last_timings  # written by the worker, not here
        video = gen.generate(PROMPTS[0], NEGATIVE, **run)
        timeline = gen.last_timeline
        with pytest.raises(ValueError, match="needs output="):
            gen.generate(PROMPTS[0], return_frames=False, **run)
    np.testing.assert_allclose(video, expected[1], atol=2e-5)
    order = ["call", "request_send", "request_encode_end", "request_decode_end", "worker_start"]
    order += ["encode_prompt_end", "denoise_end", "decode_end", "frames_end", "worker_return"]
    order += ["reply_decode_start", "reply_decode_end", "rpc_return", "handed_back"]
    assert [k for k in timeline if k in order] == order  # one clock for both processes
    assert timeline["call"] == 0.0 < timeline["handed_back"]


def test_bf16_feeds_the_transformer_in_its_dtype(folder):
    """In bf16 (diffusers keeps some of Wan's modules in float32, so the first parameter
    is float32) the latents enter the transformer in its dtype, as WanPipeline casts them,
    and the video is diffusers' to bf16's precision."""
    pipe = WanPipeline.from_pretrained(str(folder), torch_dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    kwargs = {"num_inference_steps": 2, "generator": torch.Generator().manual_seed(SEED)}
    want = pipe(prompt=PROMPTS[0], output_type="np", **kwargs, **SETTINGS).frames
    with DiffusersPipelineGenerator(folder, dtype=torch.bfloat16, devices="cpu") as gen:
        video = gen.generate(PROMPTS[0], steps=2, seed=SEED, **SETTINGS)
    np.testing.assert_allclose(video, want, atol=2e-2)


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


def test_float64_with_the_text_encoder_offloaded_to_the_cpu(folder):
    pipe = WanPipeline.from_pretrained(str(folder)).to(torch.float64)
    pipe.set_progress_bar_config(disable=True)
    run = {"num_inference_steps": STEPS, "output_type": "np", **SETTINGS}
    seeded = torch.Generator().manual_seed(SEED)
    want = pipe(prompt=PROMPTS[0], negative_prompt=NEGATIVE, generator=seeded, **run).frames
    layout = ParallelConfig(cfg=2)
    with DiffusersPipelineGenerator(
        folder, layout, dtype=torch.float64, devices="cpu", text_encoder_offload="cpu"
    ) as gen:
        assert gen.text_encoder is not None  # encoded here, whole, on the CPU
        video = gen.generate(PROMPTS[0], NEGATIVE, steps=STEPS, seed=SEED, **SETTINGS)
        stages = {"encode_prompt", "encode_image", "denoise", "decode", "frames"}
        assert set(gen.last_timings) == stages
        assert gen.last_peak_gib == {}  # peaks are measured on CUDA only
        # Precomputed embeddings (diffusers' own) give the same video.
        cond, null = pipe.encode_prompt(PROMPTS[0], NEGATIVE, max_sequence_length=512)
        again = gen.generate(
            prompt_embeds=cond, negative_prompt_embeds=null, steps=STEPS, seed=SEED, **SETTINGS
        )
    np.testing.assert_allclose(video, want, atol=1e-6)
    np.testing.assert_allclose(again, want, atol=1e-6)


def test_the_command_line_writes_the_npy_diffusers_gives(folder, expected, tmp_path):
    out = tmp_path / "foxes.npy"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "vidpar.cli.generate",
            f"model.path={folder}",
            f"prompt=[{PROMPTS[0]!r},{PROMPTS[1]!r}]",
            f"negative_prompt={NEGATIVE}",
            "parallel=sp2",
            "num_frames=5",
            "height=16",
            "width=16",
            f"steps={STEPS}",
            f"seed={SEED}",
            f"guidance_scale={SETTINGS['guidance_scale']}",
            f"output={out}",
            "hydra.run.dir=gen",
        ],
        cwd=tmp_path,
        env={**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"vidpar: wrote {out}" in result.stdout
    np.testing.assert_allclose(np.load(out), expected[2], atol=2e-5)
    wrong = subprocess.run(
        [sys.executable, "-m", "vidpar.cli.generate", f"model.path={folder / 'vae'}", "prompt=a"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert wrong.returncode != 0
    assert "is not a diffusers pipeline folder" in wrong.stdout + wrong.stderr


@pytest.mark.parametrize(
    ("variant", "name"),
    [({"boundary_ratio": 0.7}, "cfg2"), ({"expand_timesteps": True}, "sp2")],
    ids=["wan2.2-transformer_2-cfg2", "ti2v-expand_timesteps-sp2"],
)
def test_wan2_2_conventions_equal_wan_pipeline(variant, name, tmp_path):
    # 3 UniPC steps visit timesteps 999, 857, 600: with boundary 700 the last is transformer_2's.
    folder = make_tiny_wan_pipeline(tmp_path / "wan22", **variant)
    pipe = WanPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    seeded = torch.Generator().manual_seed(SEED)
    run = {"num_inference_steps": STEPS, "output_type": "np", **SETTINGS}
    want = pipe(prompt=PROMPTS[0], negative_prompt=NEGATIVE, generator=seeded, **run).frames
    sizes, _ = LAYOUTS[name]
    with DiffusersPipelineGenerator(folder, ParallelConfig(**sizes), devices="cpu") as gen:
        video = gen.generate(PROMPTS[0], NEGATIVE, steps=STEPS, seed=SEED, **SETTINGS)
    np.testing.assert_allclose(video, want, atol=2e-5)
