"""Bad input is named before any work starts (issue #27): every file of a latents folder,
the model class and optimizer settings, the output path and the memory a job needs are
checked in the main process, each mistake one paragraph naming the file or value."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file, save_file

from test_hydra_cli import compose_train, run_cli
from vidpar.cli.hydra_setup import UserError, build_layout
from vidpar.cli.validation import check_before_launch, check_train_config
from vidpar.cli.validation_generate import check_generate_request, check_generate_resources
from vidpar.data import LatentsDataModule
from vidpar.data.latents import LatentsFileError
from vidpar.models.testing import make_tiny_latents, make_tiny_wan
from vidpar.nn.dit import DiTConfig, VideoDiT
from vidpar.pipelines import VideoGenerator
from vidpar.pipelines.dit_weights import export_weights
from vidpar.resources import CONFIG_DIR


@pytest.fixture(scope="module")
def tiny_wan(tmp_path_factory) -> Path:
    return make_tiny_wan(tmp_path_factory.mktemp("models") / "tiny-wan")


def latents_with_bad_last_file(root: Path, model: Path, damage: str) -> tuple[Path, Path]:
    """A tiny latents folder of 4 samples whose last file is damaged as ``damage`` says;
    returns the folder and that file (the first file, all the old check read, is fine)."""
    folder = make_tiny_latents(root / damage, model)
    bad = folder / "000003.safetensors"
    tensors = load_file(str(bad))
    if damage == "truncated":
        bad.write_bytes(bad.read_bytes()[:-40])
        return folder, bad
    if damage == "missing_key":
        del tensors["prompt_embeds"]
    elif damage == "wrong_shape":
        tensors["latents"] = tensors["latents"][:, :, :4]
    elif damage == "wrong_rank":
        tensors["latents"] = tensors["latents"][0]
    elif damage == "wrong_dtype":
        tensors["latents"] = tensors["latents"].to(torch.int32)
    elif damage == "text_width":
        tensors["prompt_embeds"] = torch.zeros(3, 5)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(bad))
    return folder, bad


DAMAGES = {
    "truncated": r"is not a readable safetensors file .* truncated",
    "missing_key": r"has no 'prompt_embeds' tensor",
    "wrong_shape": r"latents have shape \[16, 3, 4, 6\], but .* are \[16, 3, 6, 6\]",
    "wrong_rank": r"latents has shape \[3, 6, 6\], expected \[C, T, H, W\]",
    "wrong_dtype": r"latents is I32, expected a floating-point tensor",
    "text_width": r"prompt_embeds has width D=5, but the folder's text embeddings have D=",
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_every_latents_file_is_checked_when_the_data_is_built(tmp_path, tiny_wan, damage) -> None:
    folder, bad = latents_with_bad_last_file(tmp_path, tiny_wan, damage)
    with pytest.raises(LatentsFileError, match=DAMAGES[damage]) as caught:
        LatentsDataModule(str(folder))
    assert str(bad) in str(caught.value)


def train_config(model: Path, latents: Path, *overrides: str):
    conf = compose_train(
        "recipe=wan2_1_t2v_1p3b",
        "trainer=cpu",
        f"model.path={model}",
        f"data.path={latents}",
        *overrides,
    )
    return conf, build_layout(conf.parallel)


@pytest.mark.parametrize("damage", ["truncated", "wrong_dtype"])
def test_vidpar_train_names_a_bad_latents_file_before_launch(tmp_path, tiny_wan, damage) -> None:
    folder, bad = latents_with_bad_last_file(tmp_path, tiny_wan, damage)
    conf, layout = train_config(tiny_wan, folder)
    check_train_config(conf, layout)
    with pytest.raises(UserError, match=f"data.path={folder}: {bad}"):
        check_before_launch(conf, layout)


@pytest.mark.parametrize(
    ("sizes", "message"),
    [
        ({"in_channels": 4}, r"latents have 16 channels .* takes in_channels=4"),
        ({"text_dim": 24}, r"prompt_embeds are 32 wide, but .* takes text_dim=24"),
    ],
)
def test_latents_that_do_not_fit_the_model_are_refused_by_name(tmp_path, sizes, message) -> None:
    model = make_tiny_wan(tmp_path / "model", **sizes)
    latents = make_tiny_latents(tmp_path / "latents", make_tiny_wan(tmp_path / "base"))
    conf, layout = train_config(model, latents)
    with pytest.raises(UserError, match=message) as caught:
        check_before_launch(conf, layout)
    assert f"{latents}/000000.safetensors" in str(caught.value)
    assert f"{model}/config.json" in str(caught.value)


def test_a_bad_latents_file_stops_vidpar_train_before_any_worker(tmp_path, tiny_wan) -> None:
    folder, bad = latents_with_bad_last_file(tmp_path, tiny_wan, "missing_key")
    result = run_cli(
        "vidpar.cli.train",
        "recipe=wan2_1_t2v_1p3b",
        "trainer=cpu",
        f"model.path={tiny_wan}",
        f"data.path={folder}",
        "logger=none",
        "hydra.run.dir=run",
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"{bad} has no 'prompt_embeds' tensor" in result.stderr
    assert "Traceback" not in result.stderr
    assert "output in" not in result.stdout  # printed just before the workers start


# The model and its optimizer ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.lr=-1", r"model\.lr=-1 is not a learning rate"),
        ("model.lr=0", r"model\.lr=0 is not a learning rate"),
        ("model.weight_decay=-0.1", r"model\.weight_decay=-0\.1 must be a number of at least 0"),
        ("+model.betas=[0.9,1.5]", r"model\.betas=\[0\.9, 1\.5\] must be two numbers in \[0, 1\)"),
        ("model.ema_decay=1.0", r"model\.ema_decay=1\.0 must be in \[0, 1\)"),
    ],
)
def test_bad_optimizer_settings_are_refused_before_launch(override, message) -> None:
    conf = compose_train(override)
    with pytest.raises(UserError, match=message):
        check_before_launch(conf, build_layout(conf.parallel))


def test_an_unsupported_model_class_is_refused_in_one_line(tmp_path, tiny_wan) -> None:
    folder = tmp_path / "unet"
    folder.mkdir()
    config = (tiny_wan / "config.json").read_text()
    (folder / "config.json").write_text(
        config.replace('"WanTransformer3DModel"', '"UNet2DConditionModel"')
    )
    latents = make_tiny_latents(tmp_path / "latents", tiny_wan)
    for path, override, message in (
        (folder, "model.lr=1e-5", "is a UNet2DConditionModel, which vidpar cannot parallelise"),
        (tiny_wan, "model.lr=-1", "model.lr=-1 is not a learning rate"),
    ):
        result = run_cli(
            "vidpar.cli.train",
            "recipe=wan2_1_t2v_1p3b",
            "trainer=cpu",
            f"model.path={path}",
            f"data.path={latents}",
            override,
            "logger=none",
            f"hydra.run.dir=run-{path.name}",
            cwd=tmp_path,
            timeout=300,
        )
        assert result.returncode == 2, result.stderr[-3000:]
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and message in lines[0], result.stderr[-3000:]


# A model without parallel layers -----------------------------------------------------------


@pytest.mark.parametrize(
    ("strategy", "message"),
    [
        ("vidpar_sp2", r"PlainTransformer has no sequence-parallel layer, but the layout .*sp=2"),
        ("vidpar_tp2", r"PlainTransformer has no tensor-parallel layer, but the layout .*tp=2"),
    ],
)
def test_a_plain_model_is_refused_under_sp_and_tp(strategy, message) -> None:
    import lightning.pytorch as pl

    from lightning_models import PlainTransformer

    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with pytest.raises(RuntimeError, match=message):  # the workers' RemoteError
        trainer.fit(PlainTransformer())
    assert trainer.global_step == 0


# LoRA files ----------------------------------------------------------------------------------


def test_a_lora_with_nan_factors_is_refused_naming_its_file(tmp_path, tiny_wan) -> None:
    from vidpar.models import peft_to_adapter
    from vidpar.models.testing import make_tiny_wan_lora
    from vidpar.nn.lora import LoraManager

    peft = make_tiny_wan_lora(tmp_path / "lora", tiny_wan)
    tensors = load_file(str(peft))
    key = "transformer.blocks.0.attn1.to_k.lora_B.weight"
    tensors[key][1, 0] = float("nan")
    save_file(tensors, str(peft), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"to_k in .*: lora_B holds 1 NaN or infinite values"):
        peft_to_adapter(peft)

    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    adapter = tmp_path / "ours.safetensors"
    save_file(
        {
            "0.weight.lora_A": torch.ones(1, 4),
            "0.weight.lora_B": torch.tensor([[0.0], [float("inf")], [0.0], [0.0]]),
        },
        str(adapter),
    )
    manager = LoraManager(model)
    with pytest.raises(ValueError, match=f"{adapter}: 0.weight.lora_B holds 1 NaN or infinite"):
        manager.set_adapter("style", adapter)
    assert manager.adapters == {}


def test_a_truncated_lora_file_is_named(tmp_path, tiny_wan) -> None:
    from vidpar.models import peft_to_adapter
    from vidpar.models.testing import make_tiny_wan_lora
    from vidpar.nn.lora import load_adapter

    peft = make_tiny_wan_lora(tmp_path / "lora", tiny_wan)
    peft.write_bytes(peft.read_bytes()[:-64])
    with pytest.raises(ValueError, match=f"LoRA file {peft} cannot be read .* truncated"):
        peft_to_adapter(peft)
    saved = tmp_path / "adapter.pt"
    torch.save({"0.weight.lora_A": torch.ones(1, 4)}, saved)
    saved.write_bytes(saved.read_bytes()[:100])
    with pytest.raises(ValueError, match=f"LoRA file {saved} cannot be read"):
        load_adapter(saved)


# vidpar-generate and VideoGenerator: output path and memory ---------------------------------

GEN_DIT = DiTConfig(
    in_channels=3, hidden_size=32, num_heads=4, depth=1, patch_size=(1, 4, 4), num_classes=4
)
GEN_DATA = {"class_names": ["square", "circle", "triangle", "cross"], "video_shape": [3, 8, 16, 16]}


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    return export_weights(VideoDiT(GEN_DIT), path, data_info=GEN_DATA)


def generate_resources(tmp_path: Path, *overrides: str) -> None:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        conf = compose("generate", overrides=[f"output={tmp_path}/out/x.mp4", *overrides])
    labels, shape = check_generate_request(conf, GEN_DIT, GEN_DATA)
    check_generate_resources(conf, GEN_DIT, build_layout(conf.parallel), labels, shape)


def test_generation_output_and_memory_are_checked_in_process(tmp_path) -> None:
    generate_resources(tmp_path)  # the default request fits
    assert (tmp_path / "out").is_dir()  # its folder is made (and was write-tested)
    assert list((tmp_path / "out").iterdir()) == []
    (tmp_path / "afile").write_text("not a folder")
    with pytest.raises(UserError, match=r"afile is a file, not a folder\. Change output"):
        generate_resources(tmp_path, f"output={tmp_path}/afile/x.mp4")
    (tmp_path / "taken.mp4").mkdir()
    with pytest.raises(UserError, match=r"taken\.mp4 is a folder; give a file name"):
        generate_resources(tmp_path, f"output={tmp_path}/taken.mp4")
    with pytest.raises(UserError, match=r"cannot be written: No such file or directory"):
        generate_resources(tmp_path, "output=/proc/vidpar-test/x.mp4")
    with pytest.raises(
        UserError,
        match=r"Generating 4 video\(s\) of 8×16×1000000 .* needs about \d+\.\d GiB \(2 workers"
        r" × .* this machine has \d+\.\d GiB of RAM available to all workers",
    ):
        generate_resources(tmp_path, "width=1000000")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("output=afile/x.mp4", "afile is a file, not a folder. Change output"),
        ("width=1000000", "needs about"),
    ],
)
def test_vidpar_generate_checks_output_and_memory_before_workers(
    weights, tmp_path, override, message
) -> None:
    (tmp_path / "afile").write_text("not a folder")
    result = run_cli(
        "vidpar.cli.generate",
        f"checkpoint={weights}",
        override,
        "hydra.run.dir=gen",
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert message in result.stderr and "Traceback" not in result.stderr
    assert "generating from" not in result.stdout  # printed just before workers start


def test_video_generator_checks_output_and_memory_before_sampling(weights, tmp_path) -> None:
    from vidpar.pipelines.preflight import PreflightError

    (tmp_path / "afile").write_text("not a folder")
    with VideoGenerator(GEN_DIT, weights, data_info=GEN_DATA, devices="cpu") as generator:
        with pytest.raises(PreflightError, match="afile is a file, not a folder"):
            generator.generate([0], steps=1, output=tmp_path / "afile" / "x.mp4")
        with pytest.raises(PreflightError, match=r"needs about .* GiB"):
            generator.generate([0, 1, 2, 3], width=1000000, steps=1)
        assert generator.generate([0], steps=1, show_progress=False).shape == (1, 8, 16, 16, 3)


def test_a_training_step_that_cannot_fit_memory_is_refused_before_launch(tmp_path) -> None:
    default = compose_train()
    check_before_launch(default, build_layout(default.parallel))  # the default job fits
    huge = compose_train("data.height=4096", "data.width=4096", "data.num_frames=16")
    with pytest.raises(
        UserError,
        match=r"A training step of about 1M parameters on data\.batch_size=8 samples of "
        r"16777216 tokens \(3×16×4096×4096\) with .* needs about \d+\.\d GiB \(4 workers × "
        r".* Lower data\.batch_size .* model\.dit\.activation_checkpointing=true",
    ):
        check_before_launch(huge, build_layout(huge.parallel))


def test_diffusers_generator_checks_output_and_memory_before_sampling(tmp_path, tiny_wan):
    from vidpar.models.testing import make_tiny_wan_vae
    from vidpar.pipelines import DiffusersVideoGenerator
    from vidpar.pipelines.preflight import PreflightError

    vae = make_tiny_wan_vae(tmp_path / "vae")
    (tmp_path / "afile").write_text("not a folder")
    prompt = torch.randn(3, 32)
    with DiffusersVideoGenerator(tiny_wan, vae=vae, devices="cpu") as generator:
        with pytest.raises(PreflightError, match="afile is a file, not a folder"):
            generator.generate(prompt, steps=1, output=tmp_path / "afile" / "x.mp4")
        with pytest.raises(PreflightError, match=r"1×16×1000000 .* needs about .* GiB"):
            generator.generate(prompt, steps=1, width=1000000)
        frames = generator.generate(prompt, steps=1, output=tmp_path / "new" / "x.mp4")
    assert frames.shape == (1, 1, 16, 16, 3) and (tmp_path / "new" / "x.mp4").is_file()
