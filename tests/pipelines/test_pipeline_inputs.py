"""What a pipeline folder run checks and prepares before sampling: the folder and its
components, video sizes, images, prompts (tokenized and truncated as diffusers does), and
the text encoder sharded over a replica with FSDP2 on a real gloo world."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
import torch
from diffusers import WanPipeline

from vidpar.models.testing import make_tiny_wan_pipeline
from vidpar.pipelines import prompt_encoding
from vidpar.pipelines.image_condition import read_image
from vidpar.pipelines.pipeline_folder import read_pipeline_folder

TEXTS = ["a red fox running through snow", "  the  blue &amp; river ", "a cat"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_wan_pipeline(tmp_path_factory.mktemp("pipe") / "tiny-wan-pipeline")


@pytest.fixture(scope="module")
def wan(folder):
    return WanPipeline.from_pretrained(str(folder))


def test_embeddings_equal_wan_pipeline_and_long_prompts_are_cut_with_a_warning(folder, wan, caplog):
    tokenizer = prompt_encoding.load_tokenizer(folder / "tokenizer")
    encoder = prompt_encoding.load_text_encoder(folder / "text_encoder", torch.float32)
    ids, mask = prompt_encoding.tokenize(tokenizer, TEXTS, 512)
    got = prompt_encoding.encode(encoder, ids, mask)
    want, _ = wan.encode_prompt(TEXTS, do_classifier_free_guidance=False, max_sequence_length=512)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    long = " ".join(["fox"] * 20)
    with caplog.at_level(logging.WARNING):
        ids, _ = prompt_encoding.tokenize(tokenizer, [long], 8)
    assert ids.shape == (1, 8) and "21 tokens long: cut to max_sequence_length=8" in caplog.text


def sharded_encoding(folder: str, input_ids: torch.Tensor, mask: torch.Tensor):
    """On each rank of a world of 2: the encoder loaded FSDP2-sharded over both ranks;
    returns the embeddings, the parameter elements this rank holds and the bytes of
    parameter storage it materialised, and whether ``shared``/``embed_tokens`` are one."""
    import torch.distributed as dist

    group = dist.group.WORLD
    encoder = prompt_encoding.load_text_encoder(folder, torch.float32, "cpu", group)
    locals_ = [p.to_local() for p in encoder.parameters()]
    held = sum(t.numel() for t in locals_)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in locals_}
    tied = encoder.shared.weight is encoder.encoder.embed_tokens.weight
    embeds = prompt_encoding.encode_on_replica(encoder, input_ids, mask, group)
    return embeds, held, sum(storages.values()), tied


def test_the_sharded_text_encoder_equals_the_whole_one(folder, worlds):
    """Sharded at load (built on meta, each rank reading its rows): the parameter storage
    each rank materialised is about half of the encoder, the tie of ``shared`` and
    ``embed_tokens`` survives, and the embeddings equal those of the whole encoder
    ``from_pretrained``."""
    from transformers import UMT5EncoderModel

    tokenizer = prompt_encoding.load_tokenizer(folder / "tokenizer")
    encoder = UMT5EncoderModel.from_pretrained(folder / "text_encoder").eval()
    whole = sum(p.numel() for p in encoder.parameters())
    ids, mask = prompt_encoding.tokenize(tokenizer, TEXTS, 16)  # 3 texts over 2 ranks
    want = prompt_encoding.encode(encoder, ids, mask)
    results = worlds(2).run(sharded_encoding, str(folder / "text_encoder"), ids, mask)
    for got, held, stored, tied in results:
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        assert held <= whole // 2 + 64  # each rank holds about half of it
        assert stored <= 4 * (whole // 2 + 64 * 16)  # and materialised no more (float32)
        assert tied
    assert sum(held for _, held, _, _ in results) == whole


def test_the_text_encoder_loads_whole_as_from_pretrained_does(folder):
    """Without a group the loader reads every weight (bf16: the dtypes from_pretrained
    gives, ``wo`` included) and the tie stays."""
    from transformers import UMT5EncoderModel

    for dtype in (torch.float32, torch.bfloat16):
        want = UMT5EncoderModel.from_pretrained(folder / "text_encoder", dtype=dtype)
        got = prompt_encoding.load_text_encoder(folder / "text_encoder", dtype)
        assert got.shared.weight is got.encoder.embed_tokens.weight
        state = got.state_dict()
        for name, tensor in want.state_dict().items():
            assert state[name].dtype == tensor.dtype, name
            torch.testing.assert_close(state[name], tensor, rtol=0, atol=0)


def test_a_folder_that_is_not_a_pipeline_or_lacks_a_component_is_named(folder, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no model_index\.json"):
        read_pipeline_folder(folder / "transformer")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_pipeline_folder(tmp_path / "nope")
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(FileNotFoundError, match=r"lacks vae/"):
        read_pipeline_folder(broken)
    index = json.loads((folder / "model_index.json").read_text())
    del index["text_encoder"]
    (broken / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match="lacks text_encoder"):
        read_pipeline_folder(broken)
    index["_class_name"] = "CogVideoXPipeline"
    (broken / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"'CogVideoXPipeline'.*WanPipeline, WanImageToVideo"):
        read_pipeline_folder(broken)


def test_frames_round_as_diffusers_and_bad_sizes_name_the_fix(folder, caplog):
    spec = read_pipeline_folder(folder)
    with caplog.at_level(logging.WARNING):
        assert spec.video_size(6, 16, 32) == (7, 16, 32)  # the tiny VAE: 1 + 2 k frames
    assert "num_frames=6 is not 1 + 2·k: rounded to 7" in caplog.text
    assert spec.latent_shape(5, 16, 32) == (16, 3, 8, 16)
    with pytest.raises(ValueError, match=r"multiples of 16.*height=16 width=32"):
        spec.video_size(5, 24, 40)
    with pytest.raises(ValueError, match="num_frames must be a positive integer"):
        spec.video_size(0, 16, 16)


def test_images_come_from_files_and_arrays_and_unreadable_ones_are_named(tmp_path):
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    np.testing.assert_array_equal(np.asarray(read_image(tmp_path / "a.png")), pixels)
    np.testing.assert_array_equal(np.asarray(read_image(pixels / 255.0)), pixels)
    (tmp_path / "bad.png").write_text("not an image")
    with pytest.raises(ValueError, match=r"image=.*bad.png cannot be read"):
        read_image(tmp_path / "bad.png")
    with pytest.raises(ValueError, match=r"image=.*missing.png cannot be read"):
        read_image(tmp_path / "missing.png")
    with pytest.raises(ValueError, match=r"must be \[H, W, 3\]"):
        read_image(np.zeros((4, 4)))


def check_cli(*overrides: str):
    """``vidpar-generate``'s checks of a prompt run, on the composed config (no workers)."""
    from hydra import compose, initialize_config_dir

    from vidpar.cli.hydra_setup import build_layout, register
    from vidpar.cli.validation_generate import check_prompt_request
    from vidpar.resources import CONFIG_DIR

    register()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        conf = compose("generate", overrides=["output=/tmp/vidpar-compose.mp4", *overrides])
    return check_prompt_request(conf, build_layout(conf.parallel))


def test_the_command_line_refuses_bad_prompt_runs_before_workers_start(folder, tmp_path):
    from vidpar.cli.hydra_setup import UserError

    path = f"model.path={folder}"
    blocker = tmp_path / "a-file"  # the output's "folder" is a file: nothing can be written
    blocker.write_text("")
    request = check_cli(path, "prompt=a fox", "num_frames=6", "height=16", "width=16")
    assert request["num_frames"] == 7 and request["prompt"] == "a fox"
    for overrides, message in [
        ((f"model.path={folder / 'vae'}", "prompt=a"), "is not a diffusers pipeline folder"),
        ((path,), "pass prompt=TEXT"),
        ((path, "prompt=a", f"image={tmp_path / 'x.png'}"), "is a text-to-video WanPipeline"),
        ((path, "prompt=a", "model.dtype=float8"), "model.dtype=float8 is not one of"),
        ((path, "prompt=a", "parallel.tp=8", "parallel.cfg=1"), "does not fit the layout"),
        ((path, "prompt=a", "height=20"), "pass e.g. height=16"),
        ((path, "prompt=a", f"output={blocker / 'x.npy'}"), "Change output"),
        ((path, "prompt=a", "width=1000000"), "needs about .* GiB"),
    ]:
        with pytest.raises(UserError, match=message):
            check_cli(*overrides)
