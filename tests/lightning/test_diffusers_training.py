"""DiffusersFlowModule with real Trainers on a tiny diffusers Wan: the Hydra recipe at
tp2 × sp2 equals one process on the same global batch, its sharded checkpoint resumes at
tp1 and exports to a diffusers folder, and the moving-shape clips train a 3-channel Wan."""

from __future__ import annotations

import json

import lightning.pytorch as pl
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf.errors import MissingMandatoryValue

from diffusers_modules import RecordingDiffusersModule
from lightning_models import full_weights, read_losses
from vidpar.cli.hydra_setup import register
from vidpar.data import LatentsDataModule, MovingShapesDataModule
from vidpar.lightning import DiffusersFlowModule, VidParStrategy, export_diffusers
from vidpar.models.pretrained import load_pretrained
from vidpar.models.testing import make_tiny_latents, make_tiny_wan
from vidpar.resources import CONFIG_DIR

register()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("diffusers")
    model = make_tiny_wan(root / "tiny-wan")
    return model, make_tiny_latents(root / "latents", model)


def fit(log_dir, folders, strategy, devices, max_steps, ckpt_path=None):
    """``max_steps`` steps of batch 2 over the 4 latents (2 steps an epoch), in float64,
    with the settings the recipe run of :func:`tp2_sp2` overrides."""
    model_dir, latents = folders
    log_dir.mkdir(parents=True, exist_ok=True)
    datamodule = LatentsDataModule(str(latents), batch_size=2, shuffle=False)
    module = RecordingDiffusersModule(
        str(log_dir), path=str(model_dir), lr=1e-3, cfg_dropout=0.5, timestep_shift=3.0
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_steps=max_steps,
        precision="64-true",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,  # dp = 1: every rank reads the same batches
        default_root_dir=log_dir,
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    return module


@pytest.fixture(scope="module")
def reference(folders, tmp_path_factory):
    """Four steps in this process, no layout (parallelize changes nothing)."""
    log_dir = tmp_path_factory.mktemp("reference")
    module = fit(log_dir, folders, "auto", devices=1, max_steps=4)
    return read_losses(log_dir), full_weights(module)


@pytest.fixture(scope="module")
def tp2_sp2(folders, tmp_path_factory):
    """Two steps of the wan2_1_t2v_1p3b recipe (gradient checkpointing on) at tp2 × sp2 on
    CPU processes, built as vidpar-train builds a run (``instantiate(cfg.data)``,
    ``instantiate(cfg.model, video_shape=...)``, ``build_trainer(cfg)``), with the
    reference's settings, in float64, and a checkpoint after every step (training goes on
    after a save: a sharded save once swapped the optimizer's tp moments for DTensors, and
    the next step failed)."""
    from vidpar.cli.hydra_setup import build_layout
    from vidpar.cli.train import build_trainer

    log_dir = tmp_path_factory.mktemp("tp2sp2")
    model_dir, latents = folders
    cfg = compose_train(
        "recipe=wan2_1_t2v_1p3b",
        "parallel=tp2_sp2",
        "trainer=cpu",
        f"model.path={model_dir}",
        f"data.path={latents}",
        "model._target_=diffusers_modules.RecordingDiffusersModule",
        f"+model.log_dir={log_dir}",
        "model.lr=1e-3",
        "model.cfg_dropout=0.5",
        "data.batch_size=2",
        "data.shuffle=false",
        "data.num_workers=0",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "trainer.precision=64-true",
        "trainer.gradient_clip_val=null",
        "+trainer.use_distributed_sampler=false",  # dp = 1: every rank reads the same batches
        "checkpoint.every_n_train_steps=1",
        "logger=none",
        "telemetry=off",
        f"output_dir={log_dir}",
    )
    assert cfg.model.gradient_checkpointing and cfg.model.timestep_shift == 3.0
    datamodule = instantiate(cfg.data)
    module = instantiate(cfg.model, video_shape=list(datamodule.video_shape), _convert_="all")
    trainer = build_trainer(cfg, build_layout(cfg.parallel))
    assert trainer.world_size == 4
    trainer.fit(module, datamodule=datamodule)
    return log_dir, full_weights(module)


def assert_weights_close(got, expect, tol=1e-6):
    """As in test_lightning: Adam turns last-bit gradient differences into ~1e-8."""
    assert got.keys() == expect.keys()
    for name in expect:
        err = (got[name] - expect[name]).abs().max().item()
        assert err <= tol * (1 + expect[name].abs().max().item()), (name, err)


def test_tp2_sp2_matches_one_process(reference, tp2_sp2):
    ref_losses, _ = reference
    log_dir, _ = tp2_sp2
    assert read_losses(log_dir) == pytest.approx(ref_losses[:2], rel=1e-9)
    assert len(set(ref_losses)) == 4  # the steps differ: a real comparison


def test_fsdp2_over_ring2_matches_one_process(reference, folders, tmp_path):
    """FSDP2 shards the diffusers model over the dp × sp replicas (here ring 2)."""
    ref_losses, _ = reference
    fit(tmp_path, folders, VidParStrategy(ring=2, data_parallel="fsdp"), 2, max_steps=2)
    assert read_losses(tmp_path) == pytest.approx(ref_losses[:2], rel=1e-9)


def test_the_checkpoint_holds_full_diffusers_weights_and_resumes_at_tp1(
    reference, tp2_sp2, folders, tmp_path
):
    ref_losses, ref_weights = reference
    ckpt = tp2_sp2[0] / "checkpoints" / "last.ckpt"
    from torch.distributed.checkpoint import FileSystemReader

    saved = FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    q = saved["model.model.blocks.0.attn1.to_q.weight"]  # column-parallel, saved whole
    assert list(q.size) == [32, 32]
    assert list(saved["model.model.blocks.0.ffn.net.2.weight"].size) == [32, 64]
    model = fit(tmp_path, folders, VidParStrategy(), 1, max_steps=4, ckpt_path=ckpt)
    assert read_losses(tmp_path) == pytest.approx(ref_losses[2:], rel=1e-9)
    assert_weights_close(full_weights(model), ref_weights)


def test_a_checkpoint_exports_to_a_diffusers_folder(tp2_sp2, folders, tmp_path):
    log_dir, weights = tp2_sp2
    out = export_diffusers(log_dir / "checkpoints" / "last.ckpt", tmp_path / "trained")
    assert json.loads((out / "config.json").read_text()) == json.loads(
        (folders[0] / "config.json").read_text()
    )
    trained = load_pretrained(out, dtype=torch.float64).state_dict()
    expect = {k.removeprefix("model."): v for k, v in weights.items() if k.startswith("model.")}
    assert_weights_close(trained, expect, tol=0)
    base = load_pretrained(folders[0], dtype=torch.float64).state_dict()
    assert any(not torch.equal(base[k], trained[k]) for k in base)  # it did train


def test_the_moving_shape_clips_train_a_three_channel_wan(tmp_path):
    model_dir = make_tiny_wan(tmp_path / "wan-rgb", in_channels=3, out_channels=3)
    datamodule = MovingShapesDataModule(
        num_train=8, num_val=2, batch_size=4, num_frames=2, height=8, width=8
    )
    names = list(datamodule.train_set.shape_names)
    module = DiffusersFlowModule(
        str(model_dir), lr=1e-2, class_names=names, video_shape=list(datamodule.video_shape)
    )
    assert module.class_embeds.shape == (5, 8, 32) and not module.class_embeds[-1].any()
    batch = next(iter(datamodule.val_dataloader()))
    module.configure_model()
    with torch.no_grad():
        before = float(module._loss(batch, step=-1))  # fixed noise, as validation draws it
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=10,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule=datamodule)
    with torch.no_grad():
        after = float(module._loss(batch, step=-1))
    assert after < 0.8 * before, (before, after)


def test_a_clip_needs_class_names_and_matching_channels(folders):
    with pytest.raises(ValueError, match=r"with 3 channels, but the transformer .* in_channels=16"):
        DiffusersFlowModule(str(folders[0]), video_shape=[3, 2, 8, 8])
    module = DiffusersFlowModule(str(folders[0]))
    assert (module.num_heads, module.in_channels) == (4, 16)  # read from config.json only
    assert module.model is None
    batch = {"video": torch.zeros(1, 16, 1, 2, 2), "label": torch.tensor([0])}
    with pytest.raises(ValueError, match="without class_names"):
        module._inputs(batch)


def compose_train(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=["output_dir=/tmp/vidpar-compose", *overrides])


def test_the_recipe_needs_a_diffusers_folder(tmp_path):
    cfg = compose_train("recipe=wan2_1_t2v_1p3b")
    assert cfg.model._target_.endswith("DiffusersFlowModule") and cfg.parallel.sp == 2
    assert cfg.model.gradient_checkpointing and cfg.trainer.accelerator == "gpu"
    with pytest.raises(MissingMandatoryValue, match=r"model\.path"):
        instantiate(cfg.model)
    cfg.model.path = str(tmp_path)
    with pytest.raises(Exception, match=r"is not a diffusers folder: there is no .*config\.json"):
        instantiate(cfg.model)


def test_vidpar_train_checks_the_diffusers_recipe_before_any_process(folders, tmp_path):
    """The CLI's checks read heads and channels from the folder's config.json and name
    missing folders, before anything starts."""
    from vidpar.cli.hydra_setup import UserError, build_layout
    from vidpar.cli.validation import check_before_launch, check_train_config
    from vidpar.cli.validation_model import check_data_fits_model

    model_dir, latents = folders
    good = compose_train(
        "recipe=wan2_1_t2v_1p3b", "trainer=cpu", f"model.path={model_dir}", f"data.path={latents}"
    )
    layout = build_layout(good.parallel)
    check_train_config(good, layout)
    check_before_launch(good, layout)
    check_data_fits_model(instantiate(good.data).video_shape, good.model)
    heads = compose_train(
        "recipe=wan2_1_t2v_1p3b", "parallel.sp=8", f"model.path={model_dir}", f"data.path={latents}"
    )
    with pytest.raises(UserError, match=r"num_heads\(4\) is fewer than ulysses\(8\)"):
        check_before_launch(heads, build_layout(heads.parallel))
    with pytest.raises(UserError, match=r"model\.path: no model path given"):
        check_before_launch(compose_train("recipe=wan2_1_t2v_1p3b"), layout)
    no_data = compose_train("recipe=wan2_1_t2v_1p3b", f"model.path={model_dir}")
    with pytest.raises(UserError, match=r"no data\.path: the latents data trains on a folder"):
        check_train_config(no_data, layout)
    rgb = compose_train("recipe=wan2_1_t2v_1p3b", "data=moving_shapes", f"model.path={model_dir}")
    with pytest.raises(UserError, match=r"3-channel clips .* but the model takes 16"):
        check_data_fits_model(instantiate(rgb.data).video_shape, rgb.model)
