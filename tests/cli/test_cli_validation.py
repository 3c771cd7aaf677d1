"""Every command-line value of vidpar-train and vidpar-generate is checked in the main
process before any worker starts, with one paragraph naming the override to change; runs
get output directories of their own and print only the checkpoint they wrote."""

from __future__ import annotations

import datetime
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from test_hydra_cli import GROUPS, NEEDS, compose_train, imported, options, run_cli
from vidpar.cli.hydra_setup import UserError, build_layout
from vidpar.cli.run_dirs import claim_unique_dir
from vidpar.cli.validation import check_train_config
from vidpar.cli.validation_generate import check_generate_request
from vidpar.distributed.checkpoint import is_complete
from vidpar.models.testing import make_tiny_latents, make_tiny_wan
from vidpar.nn.dit import DiTConfig, VideoDiT
from vidpar.pipelines.dit_weights import export_weights
from vidpar.resources import CONFIG_DIR

# vidpar-train ----------------------------------------------------------------------------


def check_train(*overrides: str) -> None:
    cfg = compose_train(*overrides)
    check_train_config(cfg, build_layout(cfg.parallel))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["trainer.max_steps=-5"], r"trainer\.max_steps=-5 is not a number of training steps"),
        (["trainer.max_steps=ten"], r"trainer\.max_steps=ten is not a number of training steps"),
        (["trainer.max_epochs=-3"], r"trainer\.max_epochs=-3 is not a number of epochs"),
        (["trainer.val_check_interval=0"], r"turn validation off, set trainer\.limit_val"),
        (["trainer.val_check_interval=-10"], r"val_check_interval=-10 is not a validation"),
        (["trainer.val_check_interval=1.5"], r"val_check_interval=1\.5 is not a validation"),
        (["trainer.val_check_interval=0.5"], r"set trainer\.check_val_every_n_epoch=1"),
        (["checkpoint.every_n_train_steps=-2"], r"every_n_train_steps=-2 is not a checkpoint"),
        (["checkpoint.every_n_train_steps=5000"], r"more than trainer\.max_steps=1200"),
        (["checkpoint.keep_last=0"], r"checkpoint\.keep_last=0 is not a number of checkpoint"),
        (["data.batch_size=0"], r"data\.batch_size=0 must be an integer of at least 1"),
        (["data.num_val=0"], r"data\.num_val=0 must be an integer of at least 1"),
        (["data.num_train=7"], r"one global batch of data\.batch_size=8 per replica × dp=1"),
        (
            ["parallel=sp2_dp2", "data.num_train=15"],
            r"data\.num_train to at least 16, or lower data\.batch_size",
        ),
        (["data.num_classes=9"], r"data\.num_classes=9: the moving-shapes data has one class"),
        (["data.height=18"], r"data\.height=18 is not divisible by .*patch_size=\[1, 4, 4\]"),
        (["data.num_frames=0"], r"data\.num_frames=0 must be an integer of at least 1"),
    ],
)
def test_bad_training_values_are_explained(overrides, message) -> None:
    with pytest.raises(UserError, match=message):
        check_train(*overrides)


@pytest.fixture(scope="module")
def diffusers_folders(tmp_path_factory) -> list[str]:
    """The model and latents folders the diffusers options train on."""
    root = tmp_path_factory.mktemp("diffusers")
    model = make_tiny_wan(root / "tiny-wan")
    return [f"model.path={model}", f"data.path={make_tiny_latents(root / 'latents', model)}"]


@pytest.mark.parametrize("override", [f"{g}={o}" for g in GROUPS for o in options(g)])
def test_every_shipped_option_passes_the_checks(override: str, diffusers_folders) -> None:
    diffusers = ("data=latents", "recipe=wan2_1_t2v_1p3b", "recipe=wan2_1_t2v_1p3b_lora")
    folders = diffusers_folders if override in diffusers else []
    check_train(override, *NEEDS.get(override, []), *folders)


def test_good_training_values_pass_and_minus_one_steps_means_epochs() -> None:
    check_train()  # the default job
    check_train("trainer.max_steps=0")  # set up, train nothing
    check_train("trainer.max_steps=-1", "trainer.max_epochs=-1")  # until stopped
    check_train("trainer.val_check_interval=0.25", "trainer.check_val_every_n_epoch=1")
    epochs = compose_train("trainer.max_steps=-1", "trainer.max_epochs=2")
    check_train_config(epochs, build_layout(epochs.parallel))
    saver = instantiate(epochs.checkpoint)  # no step count to save at: after every epoch
    assert saver.every_n_epochs == 1 and saver._every_n_train_steps == 0
    assert instantiate(compose_train().checkpoint)._every_n_train_steps == 1200


def test_a_bad_max_steps_fails_fast_in_a_real_run(tmp_path) -> None:
    """Before any worker starts, and before the parent imports Lightning (seconds)."""
    result = run_cli(
        "vidpar.cli.train",
        "trainer.max_steps=-5",
        "hydra.run.dir=run",
        cwd=tmp_path,
        timeout=120,
        PYTHONPROFILEIMPORTTIME="1",
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "trainer.max_steps=-5 is not a number of training steps" in result.stderr
    assert "torch" in imported(result) and "lightning" not in imported(result)
    assert "every_n_train_steps" not in result.stderr and "Traceback" not in result.stderr


# vidpar-generate -------------------------------------------------------------------------

DIT = DiTConfig(
    in_channels=3, hidden_size=32, num_heads=4, depth=1, patch_size=(1, 4, 4), num_classes=4
)
DATA_INFO = {
    "class_names": ["square", "circle", "triangle", "cross"],
    "video_shape": [3, 8, 16, 16],
}


def compose_generate(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("generate", overrides=["output=/tmp/vidpar-compose/x.mp4", *overrides])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["labels=[0,9]"], r"labels=\[0, 9\] cannot be generated: class 9 is outside 0\.\.3"),
        (["labels=dog"], r"labels=dog cannot be generated: 'dog' is not a class .*'circle'"),
        (["labels=[]"], r"give at least one class"),
        (["steps=0"], r"steps=0 cannot be generated: steps must be a positive integer"),
        (["steps=2.5"], r"steps must be a positive integer, got 2\.5"),
        (["guidance_scale=nan"], r"guidance_scale=nan cannot .* must be a finite number"),
        (["guidance_scale=-inf"], r"guidance_scale must be a finite number, got -inf"),
        (["seed=x"], r"seed=x cannot be generated: seed must be an integer"),
        (["height=18"], r"height=18 cannot .* not divisible by the model's patch_size"),
        (["num_frames=0"], r"num_frames must be a positive integer, got 0"),
        (["output=samples.avi"], r"output must end in \.mp4 or \.gif"),
    ],
)
def test_bad_generation_values_are_explained(overrides, message) -> None:
    with pytest.raises(UserError, match=message):
        check_generate_request(compose_generate(*overrides), DIT, DATA_INFO)


def test_good_generation_values_pass() -> None:
    assert check_generate_request(compose_generate(), DIT, DATA_INFO) == (
        [0, 1, 2, 3],
        (3, 8, 16, 16),
    )
    one = compose_generate("labels=circle", "num_frames=4", "height=32", "guidance_scale=1")
    assert check_generate_request(one, DIT, DATA_INFO) == ([1], (3, 4, 32, 16))


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    return export_weights(VideoDiT(DIT), path, data_info=DATA_INFO)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("labels=[0,7]", "labels=[0, 7] cannot be generated: class 7 is outside 0..3"),
        ("guidance_scale=nan", "guidance_scale=nan cannot be generated"),
    ],
)
def test_generate_fails_before_starting_workers(weights, tmp_path, override, message) -> None:
    result = run_cli(
        "vidpar.cli.generate",
        f"checkpoint={weights}",
        override,
        "hydra.run.dir=gen",
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert message in result.stderr and "Traceback" not in result.stderr
    assert "generating from" not in result.stdout  # printed just before workers start
    assert not (tmp_path / "gen" / "samples.mp4").exists()


# Output directories ----------------------------------------------------------------------


def test_claiming_a_taken_directory_numbers_it(tmp_path) -> None:
    base = tmp_path / "outputs" / "12-00-00"
    assert claim_unique_dir(base) == base
    assert claim_unique_dir(base) == base.with_name("12-00-00-1")
    assert claim_unique_dir(base) == base.with_name("12-00-00-2")


def test_runs_started_together_get_their_own_dirs_and_print_what_they_wrote(tmp_path) -> None:
    """Two real vidpar-train runs and a sweep of two jobs start at once in one directory,
    with Hydra's default (time-stamped) directories; every time stamp of the next ten
    minutes is taken already, as if runs had started in each of those seconds."""
    now = datetime.datetime.now()
    taken = set()
    for second in range(600):
        stamp = now + datetime.timedelta(seconds=second)
        for top in ("outputs", "multirun"):
            path = tmp_path / top / stamp.strftime("%Y-%m-%d") / stamp.strftime("%H-%M-%S")
            path.mkdir(parents=True)
            taken.add(path)
    common = ["parallel=single", "logger=none", "telemetry=off", "data.num_train=8"]
    common += ["model.num_sample_videos=0", "trainer.val_check_interval=2"]
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    commands = [["trainer.max_steps=0"], ["trainer.max_steps=2"]]
    commands.append(["--multirun", "trainer.max_steps=0", "seed=0,1"])
    runs = [
        subprocess.Popen(
            [sys.executable, "-m", "vidpar.cli.train", *args, *common],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for args in commands
    ]
    outputs = [run.communicate(timeout=600)[0] for run in runs]
    for run, output in zip(runs, outputs, strict=True):
        assert run.returncode == 0, output[-3000:]
    dirs = [Path(d) for out in outputs for d in re.findall(r"output in (\S+)", out)]
    assert len(set(dirs)) == 4 and not taken & set(dirs)
    assert [d.parent.parent for d in dirs[:2]] == [tmp_path / "outputs"] * 2
    sweep = dirs[2].parent  # the sweep's jobs share its one new directory
    assert sweep not in taken and sweep.parent.parent == tmp_path / "multirun"
    assert dirs[2:] == [sweep / "0", sweep / "1"]
    for d, override in zip(dirs, ["max_steps=0", "max_steps=2", "seed=0", "seed=1"], strict=True):
        assert (d / "train.log").is_file()  # each dir holds one run's files
        assert override in (d / ".hydra" / "overrides.yaml").read_text()
    # max_steps=0 trains and saves nothing, and says so; the other names what it wrote.
    assert "vidpar: no checkpoint was written (trainer.max_steps=0" in outputs[0]
    assert "vidpar: checkpoint" not in outputs[0] + outputs[2]
    written = Path(re.search(r"vidpar: checkpoint (\S+)", outputs[1]).group(1))
    assert is_complete(written) and written.parent == dirs[1] / "checkpoints"
