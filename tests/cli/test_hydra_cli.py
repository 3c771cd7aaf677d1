"""Hydra composition of every config group and recipe, the CLI's errors, and end-to-end
runs of vidpar-train / vidpar-generate on CPU."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path, PurePosixPath

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, MissingConfigException
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf

import vidpar
from vidpar.cli.hydra_setup import UserError, build_layout, register
from vidpar.cli.usage import COMMANDS, recipe_summary, usage
from vidpar.cli.validation import check_before_launch, check_checkpoint_model
from vidpar.cli.validation_model import check_data_fits_model
from vidpar.config import PRESETS, ParallelConfig
from vidpar.distributed.checkpoint import TRAINER_STATE, is_complete
from vidpar.executor.start_method import PRELOAD, PRELOAD_IF_IMPORTED
from vidpar.lightning import VideoDiffusionModule
from vidpar.pipelines.video_io import read_video
from vidpar.resources import CONFIG_DIR

register()
CONF = Path(CONFIG_DIR)
GROUPS = ["parallel", "model", "data", "trainer", "logger", "telemetry", "recipe"]


def compose_generate(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("generate", overrides=["output=/tmp/vidpar-compose.mp4", *overrides])


def compose_train(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        # output_dir normally comes from Hydra's run directory, which compose() has not.
        return compose("train", overrides=["output_dir=/tmp/vidpar-compose", *overrides])


def options(group: str) -> list[str]:
    if group == "parallel":  # the presets live in one table, which Hydra and Lightning read
        return sorted(PRESETS)
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


#: Options that only make sense with others: precomputed latents train a latent model (the
#: class-conditioned default DiT reads data.num_classes, which latents have not).
NEEDS = {"data=latents": ["model=wan2_1_t2v_1p3b"]}


@pytest.mark.parametrize(
    "override", [f"{g}={o}" for g in GROUPS for o in options(g)], ids=lambda o: o
)
def test_every_option_composes_and_names_real_classes(override: str) -> None:
    cfg = compose_train(override, *NEEDS.get(override, []))
    OmegaConf.resolve(cfg)
    layout = build_layout(cfg.parallel)
    assert cfg.trainer.devices is None and layout.world_size >= 1  # the layout sets devices
    for node in (cfg.model, cfg.data, cfg.trainer, cfg.strategy, cfg.checkpoint):
        assert get_class(node._target_)
    if cfg.logger:
        assert get_class(cfg.logger._target_)


def test_recipes_set_their_layout() -> None:
    assert build_layout(compose_train("recipe=tiny_c2v_sp2").parallel).describe() == (
        "dp1 × cfg1 × ring1 × ulysses2 × tp1 = 2"
    )
    big = compose_train("recipe=wan_like_1p3b_sp2")
    assert big.model.dit.hidden_size == 1536 and big.trainer.accelerator == "gpu"
    # 21 × 60 × 104 latents with patch 1×2×2: 32,760 tokens, as Wan2.1 at 81 × 480 × 832.
    assert big.data.num_frames * big.data.height * big.data.width // 4 == 32760
    # The command line wins over the recipe.
    assert compose_train("recipe=tiny_c2v_sp2", "parallel=tp2").parallel.tp == 2


def test_wheels_carry_every_config() -> None:
    """The configs live in the package (``vidpar/conf`` links to the checkout's ``conf/``) and
    pyproject's package-data patterns cover each file, so a non-editable install has them."""
    package = Path(vidpar.__file__).resolve().parent
    assert Path(CONFIG_DIR) == package / "conf"
    patterns = tomllib.loads((package.parents[1] / "pyproject.toml").read_text())["tool"][
        "setuptools"
    ]["package-data"]["vidpar"]
    files = [
        PurePosixPath(os.path.relpath(Path(root) / name, package))
        for root, _, names in os.walk(CONFIG_DIR, followlinks=True)
        for name in names
    ]
    assert len(files) >= 15 and PurePosixPath("conf/recipe/tiny_t2v_cpu.yaml") in files
    for file in files:
        assert any(file.match(pattern) for pattern in patterns), f"{file} would not ship"


#: Recipes of diffusers models (their folders are given on the command line): their data
#: goes through their model in test_diffusers_training and test_lora_training.
DIFFUSERS_RECIPES = {"wan2_1_t2v_1p3b", "wan2_1_t2v_1p3b_lora"}


@pytest.mark.parametrize("recipe", sorted(set(options("recipe")) - DIFFUSERS_RECIPES))
def test_every_recipe_feeds_its_data_through_its_model(recipe: str) -> None:
    """Clip size, channels and patch fit together: one clip goes through the recipe's DiT at
    its own clip size (width and depth shrunk so that is cheap on a CPU)."""
    cfg = compose_train(f"recipe={recipe}", "data.num_train=2", "data.num_val=2")
    datamodule = instantiate(cfg.data)
    check_data_fits_model(datamodule.video_shape, cfg.model)
    small = {"hidden_size": 32, "num_heads": 2, "depth": 1}
    cfg.model.dit.update(small)
    module = instantiate(cfg.model, video_shape=list(datamodule.video_shape), _convert_="all")
    module.configure_model()
    clip = datamodule.train_set[0]
    video = torch.as_tensor(clip["video"])[None]
    with torch.no_grad():
        out = module.model(video, torch.tensor([0.5]), torch.tensor([clip["label"]]))
    assert out.shape == video.shape and torch.isfinite(out).all()


def test_data_and_model_channels_that_disagree_are_explained() -> None:
    cfg = compose_train("model=wan_like_1p3b")
    with pytest.raises(UserError, match=r"model takes 16 \(model\.dit\)\. Set model\.dit\.in_chan"):
        check_data_fits_model(instantiate(cfg.data).video_shape, cfg.model)
    with pytest.raises(ValueError, match=r"has 3 channels, but the DiT takes in_channels=16"):
        VideoDiffusionModule(dit={"in_channels": 16}, video_shape=[3, 8, 16, 16])


def test_typos_and_wrong_types_fail_at_compose_time() -> None:
    with pytest.raises(ConfigCompositionException, match=r"parallel\.tpp"):
        compose_train("parallel.tpp=2")
    with pytest.raises(ConfigCompositionException, match=r"parallel\.tp=two"):
        compose_train("parallel.tp=two")
    with pytest.raises(MissingConfigException, match="Available options in 'recipe'"):
        compose_train("recipe=nope")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["parallel.tp=0"], "parallel size tp must be a positive integer, got 0"),
        (["parallel.ulysses=2", "parallel.ring=2"], r"set parallel\.sp=4 or parallel\.sp=null"),
        (
            ["model.dit.num_heads=2"],
            r"num_heads\(2\) is fewer than ulysses\(2\) × tp\(2\) = 4",
        ),
        (["ckpt_path=/no/such/ckpt"], "is not a complete vidpar checkpoint"),
        (["trainer=gpu"], "needs 4 GPUs, but this machine has 0"),
        (
            ["+model.dit.activation_checkpointing=maybe"],
            r"model\.dit: activation_checkpointing must be one of",
        ),
        (
            ["+model.dit.activation_checkpointing=keep_attention", "parallel=ring2"],
            r"model\.dit: .*keep_attention.* does not work with ring attention",
        ),
    ],
)
def test_mistakes_are_explained_before_any_process_starts(overrides, message) -> None:
    cfg = compose_train(*overrides)
    with pytest.raises(UserError, match=message):
        check_before_launch(cfg, build_layout(cfg.parallel))


def run_cli(
    *args: str, cwd: Path, timeout: float = 300, **env_vars: str
) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", **env_vars}
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def imported(result: subprocess.CompletedProcess) -> set[str]:
    """The modules a run under ``PYTHONPROFILEIMPORTTIME=1`` imported."""
    return set(re.findall(r"^import time:.*\| +([\w.]+)$", result.stderr, re.MULTILINE))


def test_help_and_cfg_show_the_composed_config(tmp_path) -> None:
    """They show it at once: no torch, Lightning or worker imported (seconds each)."""
    shown = run_cli(
        "vidpar.cli.train",
        "--cfg",
        "job",
        "parallel=usp_2x2",
        cwd=tmp_path,
        timeout=120,
        PYTHONPROFILEIMPORTTIME="1",
    )
    assert shown.returncode == 0, shown.stderr
    assert "ulysses: 2" in shown.stdout and "ring: 2" in shown.stdout
    assert "hydra" in imported(shown) and not {"torch", "lightning"} & imported(shown)
    for command in ("train", "generate"):
        helped = run_cli(
            f"vidpar.cli.{command}",
            "--help",
            cwd=tmp_path,
            timeout=120,
            PYTHONPROFILEIMPORTTIME="1",
        )
        assert helped.returncode == 0, helped.stderr
        assert "hydra" in imported(helped) and "torch" not in imported(helped)
        # vidpar's usage first, then Hydra's help.
        assert helped.stdout.startswith(f"vidpar-{command}: ")
        if command == "generate":  # only what it accepts: no training groups
            ours, hydras = helped.stdout.split("== Config ==")
            assert ours.rstrip() == usage(command).rstrip()
            assert "recipe" not in hydras and "trainer" not in hydras
            assert "model:\n  path: null" in hydras and "prompt: null" in hydras
            continue
        ours, hydras = helped.stdout.split("== Configuration groups ==")
        assert ours.rstrip() == usage(command).rstrip()
        assert "== Config ==" in hydras
        assert "parallel: cfg2, ring2, single, sp2" in hydras and "schema" not in hydras
        assert "recipe: tiny_c2v_sp2, tiny_t2v_cpu" in hydras


def test_the_fork_server_preloads_what_the_commands_workers_import() -> None:
    """Training workers get Lightning and, for a diffusers model, its code; generating
    workers never use Lightning (seconds of CPU per vidpar-generate), a pipeline's do use
    diffusers' and transformers' model code."""
    from vidpar.cli import generate, train

    assert train.worker_imports(compose_train()) == PRELOAD
    recipe = train.worker_imports(compose_train("recipe=wan2_1_t2v_1p3b", "model.path=tiny"))
    assert recipe == (*PRELOAD, "diffusers.models.transformers")
    tiny = generate.worker_imports(compose_generate())
    assert "torch" in tiny and not [m for m in tiny if "lightning" in m]
    pipeline = generate.worker_imports(compose_generate("model.path=tiny", "prompt=a"))
    assert set(PRELOAD_IF_IMPORTED) <= set(pipeline)
    assert not [m for m in pipeline if "lightning" in m]


def test_usage_lists_what_is_shipped_and_names_real_overrides() -> None:
    text = usage("train")
    for name, sizes in PRESETS.items():
        assert re.search(
            rf"^  {name} +{re.escape(ParallelConfig(**sizes).describe())}$", text, re.M
        )
    for recipe in options("recipe"):
        summary = recipe_summary(CONF / "recipe" / f"{recipe}.yaml")
        assert summary and f"  {recipe}  " in text and summary in text
    assert "A tiny class-to-video DiT, Ulysses sequence parallelism" in text
    assert "wandb|" not in text and "csv|none|wandb" in text  # the logger options, as shipped
    composed = {"train": compose_train(), "generate": compose_generate()}
    for command, (_, _, overrides) in COMMANDS.items():
        for override, _ in overrides:
            key = override.split("=")[0]  # a config group, or a key of the config
            found = OmegaConf.select(composed[command], key, default="absent") != "absent"
            assert key in GROUPS or found, key


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> tuple[Path, str]:
    """A short sp2 CPU run of vidpar-train in a fresh working directory: it and the console."""
    cwd = tmp_path_factory.mktemp("cli")
    result = run_cli(
        "vidpar.cli.train",
        "parallel=sp2",
        "trainer.max_steps=6",
        "trainer.val_check_interval=3",
        "trainer.log_every_n_steps=1",
        "telemetry.log_every_n_steps=1",
        "data.num_train=48",
        "model.sample_steps=2",
        "hydra.run.dir=run",
        cwd=cwd,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Communication summary" in result.stdout + result.stderr
    return cwd, result.stdout + result.stderr


@pytest.fixture(scope="module")
def trained(trained_run) -> Path:
    return trained_run[0]


def test_console_prints_lightning_messages_once_and_the_log_file_keeps_them(trained_run) -> None:
    cwd, console = trained_run
    assert console.count("GPU available: False, used: False") == 1
    assert "LeafSpec" not in console  # Lightning-vs-torch deprecation, silenced in workers
    assert "GPU available: False" in (cwd / "run" / "train.log").read_text()


def test_train_writes_checkpoint_wandb_run_and_samples(trained: Path) -> None:
    run = trained / "run"
    assert is_complete(run / "checkpoints" / "last.ckpt")
    offline = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(offline) == 1
    data = offline[0].read_bytes()
    for key in (
        b"comm/ulysses/all_to_all/calls",
        b"comm/ulysses/all_to_all/busbw_GBps",
        b"train/loss",
    ):
        assert key in data, key
    assert b"comm/summary" in data  # the wandb.Table logged at the end of fit
    assert sorted((run / "samples").glob("*.gif"))  # validation sampled videos on every rank
    media = offline[0].parent / "files" / "media"
    assert sorted(media.glob("videos/val/samples_*.gif"))  # logged as W&B videos
    assert sorted(media.glob("table/comm/summary_*.table.json"))


def test_workers_do_not_rerun_hydra_or_move(trained: Path) -> None:
    """Spawned workers must not compose again, make their own output dirs or chdir."""
    assert sorted(p.name for p in trained.iterdir()) == ["run"]
    assert len(list(trained.glob("**/.hydra"))) == 1


def test_generate_writes_a_video_of_the_latest_checkpoint(trained: Path) -> None:
    result = run_cli(
        "vidpar.cli.generate",
        "search_dir=run",
        "labels=[0,1]",
        "steps=3",
        "parallel=cfg2",
        "hydra.run.dir=gen",
        cwd=trained,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    frames = read_video(trained / "gen" / "samples.mp4")
    gif = read_video(trained / "gen" / "samples.gif")
    assert frames.shape[0] == gif.shape[0] == 8
    assert frames.std() > 1.0  # not a blank video
    assert "Communication summary" in result.stdout
    assert "vidpar: no checkpoint= given: using the last training run under run/" in result.stdout
    log = (trained / "gen" / "generate.log").read_text()
    for line in result.stdout.splitlines():
        assert line in log, line  # the console, the workers' summary table included
    assert "Communication summary" in log and "\x1b" not in log


def test_resuming_into_another_model_names_the_settings_to_use(trained: Path) -> None:
    ckpt = trained / "run" / "checkpoints" / "last.ckpt"
    same = compose_train("parallel=sp2", f"ckpt_path={ckpt}")
    check_before_launch(same, build_layout(same.parallel))  # the model it was written by: fine
    other = compose_train(
        f"ckpt_path={ckpt}",
        "model.dit.hidden_size=64",
        "model.dit.patch_size=[1,2,2]",
        "model.ema_decay=0",
    )
    with pytest.raises(UserError) as err:
        check_before_launch(other, build_layout(other.parallel))
    message = str(err.value)
    assert "was written by a different model" in message
    for override in ("model.dit.hidden_size=128", "model.dit.patch_size=[1,4,4]"):
        assert override in message
    assert "model.ema_decay=0.99" in message


def test_resuming_may_turn_compilation_on_and_names_the_modulation_of_old_checkpoints(
    trained: Path, tmp_path
) -> None:
    ckpt = trained / "run" / "checkpoints" / "last.ckpt"
    check_checkpoint_model(ckpt, compose_train("model.dit.compile=aot_eager").model)
    state = torch.load(ckpt / TRAINER_STATE, weights_only=False)
    del state["hyper_parameters"]["dit"]["modulation"]  # as vidpar 0.1.0 wrote it
    old = tmp_path / "old.ckpt"
    old.mkdir()
    torch.save(state, old / TRAINER_STATE)
    with pytest.raises(
        UserError, match=r"Resume with its settings \(model\.dit\.modulation=per_block\)"
    ):
        check_checkpoint_model(old, compose_train().model)
    check_checkpoint_model(old, compose_train("model.dit.modulation=per_block").model)


def test_a_bad_size_on_the_command_line_is_one_paragraph(tmp_path) -> None:
    result = run_cli(
        "vidpar.cli.train", "parallel.tp=0", "hydra.run.dir=run", cwd=tmp_path, timeout=120
    )
    assert result.returncode == 2
    assert "parallel size tp must be a positive integer, got 0" in result.stderr
    assert "Traceback" not in result.stderr


def test_generate_without_a_checkpoint_explains_itself(tmp_path) -> None:
    result = run_cli("vidpar.cli.generate", "hydra.run.dir=gen", cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert "No checkpoint found" in result.stderr and "run vidpar-train first" in result.stderr
    assert "Traceback" not in result.stderr
