"""vidpar.data.preprocess_videos on a tiny Wan pipeline folder built here (the tiny VAE, a
tiny umT5 from a config, a word-level tokenizer built with ``tokenizers``): the latents
folder it writes is what diffusers' own VAE and WanPipeline.encode_prompt give, readable by
LatentsDataset, resumable, the same at world 2 (dp2, and the VAE split over sp2) as at
world 1, with bad videos skipped and counted."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from vidpar import ParallelConfig
from vidpar.data import LatentsDataset
from vidpar.data.preprocess import _clip, preprocess_videos
from vidpar.models.testing import make_tiny_wan_vae
from vidpar.pipelines.video_io import write_video

WORDS = ["a", "red", "ball", "rolls", "blue", "cube", "spins", "the", "night"]


def make_pipeline(root):
    """``vae/``, ``text_encoder/`` (umT5, random) and ``tokenizer/`` of a tiny Wan pipeline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    make_tiny_wan_vae(root / "vae")
    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    ).save_pretrained(root / "tokenizer")
    torch.manual_seed(0)
    config = UMT5Config(
        vocab_size=len(vocab), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4
    )
    UMT5EncoderModel(config).save_pretrained(root / "text_encoder")
    return root


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return make_pipeline(tmp_path_factory.mktemp("pipe"))


def frames(seed, count=9, height=24, width=40):
    gen = np.random.default_rng(seed)
    return gen.integers(0, 256, (count, height, width, 3), dtype=np.uint8)


@pytest.fixture
def videos(tmp_path):
    folder = tmp_path / "videos"
    folder.mkdir()
    for name in ("a", "b", "c", "bad"):
        write_video(folder / f"{name}.mp4", frames(len(name)), upscale=1)
    (folder / "bad.mp4").write_bytes(b"not a video")
    (folder / "a.txt").write_text("a red ball rolls")
    (folder / "bad.txt").write_text("the night")
    (folder / "captions.jsonl").write_text(json.dumps({"file": "b.mp4", "caption": "blue cube"}))
    return folder  # c.mp4 has no caption


def test_the_latents_are_what_diffusers_encodes(pipeline, videos, tmp_path):
    from diffusers import AutoencoderKLWan, WanPipeline
    from transformers import AutoTokenizer, UMT5EncoderModel

    from vidpar.data.preprocess import _read_frames

    out = tmp_path / "latents"
    report = preprocess_videos(
        videos, pipeline, out, num_frames=5, height=16, width=16, devices="cpu"
    )
    assert report.written == ["a.mp4", "b.mp4"]
    assert report.uncaptioned == ["c.mp4"] and report.unreadable == ["bad.mp4"]
    dataset = LatentsDataset(out)
    assert len(dataset) == 2

    vae = AutoencoderKLWan.from_pretrained(pipeline / "vae").eval()
    pipe = WanPipeline(
        tokenizer=AutoTokenizer.from_pretrained(pipeline / "tokenizer"),
        text_encoder=UMT5EncoderModel.from_pretrained(pipeline / "text_encoder").eval(),
        vae=None,
        transformer=None,
        scheduler=None,
    )
    sample = load_file(str(out / "a.safetensors"))
    clip = _clip(_read_frames(videos / "a.mp4"), 5, 16, 16)
    with torch.no_grad():
        z = vae.encode(clip[None]).latent_dist.mean
        mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
        std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
        embeds, _ = pipe.encode_prompt("a red ball rolls", do_classifier_free_guidance=False)
    torch.testing.assert_close(sample["latents"], ((z - mean) / std)[0], rtol=0, atol=0)
    assert sample["prompt_embeds"].shape == (4, 32)  # 4 words, unpadded
    torch.testing.assert_close(sample["prompt_embeds"], embeds[0, :4], rtol=0, atol=0)
    assert not embeds[0, 4:].any()  # what is left out is the padding

    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = preprocess_videos(videos, pipeline, out, num_frames=5, height=16, width=16)
    assert again.existing == ["a.mp4", "b.mp4"] and not again.written
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_a_rerun_rewrites_only_what_is_missing_or_stale(pipeline, videos, tmp_path):
    """Half of the outputs deleted, a source video touched: only those are written again."""
    import os

    out = tmp_path / "latents"
    run = {"num_frames": 5, "height": 16, "width": 16, "devices": "cpu", "progress": False}
    for name in ("c", "d"):  # two more captioned videos: four samples in all
        write_video(videos / f"{name}.mp4", frames(ord(name)), upscale=1)
        (videos / f"{name}.txt").write_text("a blue cube spins")
    assert preprocess_videos(videos, pipeline, out, **run).written == [
        "a.mp4",
        "b.mp4",
        "c.mp4",
        "d.mp4",
    ]
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    (out / "a.safetensors").unlink()
    (out / "c.safetensors").unlink()
    stamp = (videos / "d.mp4").stat()
    os.utime(videos / "d.mp4", ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 10**9))
    again = preprocess_videos(videos, pipeline, out, **run)
    assert again.written == ["a.mp4", "c.mp4", "d.mp4"] and again.existing == ["b.mp4"]
    assert again.unreadable == ["bad.mp4"]
    assert (out / "b.safetensors").stat().st_mtime_ns == before["b.safetensors"]


def test_frames_are_sampled_evenly_resized_and_centre_cropped():
    video = np.zeros((9, 20, 40, 3), dtype=np.uint8)
    video[:, :, :, 0] = np.arange(9)[:, None, None] * 30  # red: the frame's index
    video[:, :, 6:34, 1] = 255  # green: the middle of the width, a little wider than the crop
    clip = _clip(video, 5, 10, 10)  # 20 × 40 → 10 × 20, then the centre 10 × 10
    assert clip.shape == (3, 5, 10, 10)
    red = (clip[0, :, 0, 0] + 1) * 127.5
    torch.testing.assert_close(red, torch.tensor([0.0, 60, 120, 180, 240]), rtol=0, atol=1e-3)
    assert (clip[1] > 0.99).all()  # only the green middle is kept


def test_bad_settings_fail_before_any_encoding(pipeline, videos, tmp_path):
    with pytest.raises(ValueError, match=r"num_frames must be 4k \+ 1.*got 8"):
        preprocess_videos(videos, pipeline, tmp_path / "o", num_frames=8)
    with pytest.raises(FileNotFoundError, match=r"not a diffusers pipeline folder with vae/"):
        preprocess_videos(videos, tmp_path, tmp_path / "o", num_frames=5)
    assert not (tmp_path / "o").exists()


def test_world_2_writes_what_world_1_writes(pipeline, videos, tmp_path):
    """float64: dp2 (a video per rank) and sp2 (each video's VAE split in rows over both
    ranks, the text encoder sharded over them) write world 1's samples."""
    run = {"num_frames": 5, "height": 32, "width": 16, "devices": "cpu", "progress": False}
    run |= {"dtype": torch.float64, "negative_prompt": "the night"}
    preprocess_videos(videos, pipeline, tmp_path / "one", **run)
    want = {p.name: load_file(str(p)) for p in (tmp_path / "one").iterdir()}
    assert sorted(want) == ["a.safetensors", "b.safetensors"]
    for sizes in ({"dp": 2}, {"ulysses": 2}):
        out = tmp_path / "-".join(sizes)
        report = preprocess_videos(videos, pipeline, out, parallel=ParallelConfig(**sizes), **run)
        assert report.written == ["a.mp4", "b.mp4"] and report.unreadable == ["bad.mp4"]
        for name, tensors in want.items():
            got = load_file(str(out / name))
            assert (
                got.keys()
                == tensors.keys()
                == {"latents", "prompt_embeds", "negative_prompt_embeds"}
            )
            for key, tensor in tensors.items():
                torch.testing.assert_close(got[key], tensor, rtol=1e-10, atol=1e-12)


def test_vidpar_preprocess_runs_from_the_command_line(pipeline, videos, tmp_path):
    """The console command (``python -m`` runs the same entry point), and a bad setting
    explained in one paragraph before any encoding."""
    import os
    import subprocess
    import sys

    def command(run, *overrides):
        args = [sys.executable, "-m", "vidpar.cli.preprocess", f"videos={videos}"]
        args += [f"pipeline={pipeline}", f"out={tmp_path / 'latents'}", "height=16", "width=16"]
        args += [f"hydra.run.dir={tmp_path / run}", *overrides]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        return subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)

    done = command("run1", "num_frames=5")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "2 written (" in done.stdout
    assert "0 already there, 1 unreadable or too short, 1 without a caption" in done.stdout
    assert "skipped, unreadable or too short: bad.mp4" in done.stdout
    assert len(LatentsDataset(tmp_path / "latents")) == 2
    bad = command("run2", "num_frames=6")
    assert bad.returncode == 2 and "num_frames must be 4k + 1" in bad.stderr
