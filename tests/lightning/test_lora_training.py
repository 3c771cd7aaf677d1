"""LoRA training of a tiny diffusers Wan with real Trainers: tp2 × sp2 (the LoRA recipe,
DDP over sp), ulysses2 × ring2 (FSDP2) and dp2 (DDP) give one process's losses on the same
global batch, the base never changes, the adapters-only checkpoint resumes at tp1, and the
exported file loads in diffusers' WanPipeline and in vidpar with the trained model's output."""

from __future__ import annotations

import json
import math

import lightning.pytorch as pl
import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader

from diffusers_modules import BaseCheckingLoraModule
from lightning_models import read_losses
from test_diffusers_training import compose_train
from vidpar.data import LatentsDataModule
from vidpar.lightning import DiffusersFlowModule, VidParStrategy, export_diffusers, export_lora
from vidpar.models.pretrained import load_pretrained
from vidpar.models.testing import make_tiny_latents, make_tiny_wan
from vidpar.nn.frozen_weights import AUTOCAST_MATMUL_LAYERS
from vidpar.nn.lora import LoraManager
from vidpar.nn.lora_layers import lora_parameters
from vidpar.nn.lora_peft import LORA_WEIGHTS, peft_to_adapter

LORA = {"rank": 2, "alpha": 4}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    model = make_tiny_wan(root / "tiny-wan")
    return model, make_tiny_latents(root / "latents", model)


def fit(
    log_dir,
    folders,
    strategy,
    devices,
    max_steps,
    batch_size=2,
    ckpt_path=None,
    precision="64-true",
    **module_kwargs,
):
    """``max_steps`` LoRA steps of global batch 2 over the 4 latents, in float64."""
    model_dir, latents = folders
    log_dir.mkdir(parents=True, exist_ok=True)
    datamodule = LatentsDataModule(str(latents), batch_size=batch_size, shuffle=False)
    module = BaseCheckingLoraModule(
        str(log_dir), path=str(model_dir), lr=1e-2, cfg_dropout=0.5, lora=LORA, **module_kwargs
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_steps=max_steps,
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        default_root_dir=log_dir,
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    return module


def base_reports(log_dir, ranks):
    return [json.loads((log_dir / f"base_{r}.json").read_text()) for r in range(ranks)]


@pytest.fixture(scope="module")
def reference(folders, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("reference")
    fit(log_dir, folders, "auto", devices=1, max_steps=4)
    return log_dir, read_losses(log_dir)


@pytest.fixture(scope="module")
def tp2_sp2(folders, tmp_path_factory):
    """Three steps of the LoRA recipe (gradient checkpointing on) at tp2 × sp2 on CPU, built
    as vidpar-train builds a run, with a checkpoint after every step. (B starts at zero, so
    A's gradient is zero in step 1: only step 3's loss sees a wrong A gradient of step 2.)"""
    from hydra.utils import instantiate

    from vidpar.cli.hydra_setup import build_layout
    from vidpar.cli.train import build_trainer

    log_dir = tmp_path_factory.mktemp("tp2sp2")
    model_dir, latents = folders
    cfg = compose_train(
        "recipe=wan2_1_t2v_1p3b_lora",
        "parallel=tp2_sp2",
        "trainer=cpu",
        f"model.path={model_dir}",
        f"data.path={latents}",
        "model._target_=diffusers_modules.BaseCheckingLoraModule",
        f"+model.log_dir={log_dir}",
        "model.lr=1e-2",
        "model.cfg_dropout=0.5",
        "model.timestep_shift=1.0",
        f"model.lora.rank={LORA['rank']}",
        f"model.lora.alpha={LORA['alpha']}",
        "data.batch_size=2",
        "data.shuffle=false",
        "data.num_workers=0",
        "trainer.max_steps=3",
        "trainer.val_check_interval=2",
        "trainer.precision=64-true",
        "trainer.gradient_clip_val=null",
        "+trainer.use_distributed_sampler=false",
        "checkpoint.every_n_train_steps=1",
        "logger=none",
        "telemetry=off",
        f"output_dir={log_dir}",
    )
    assert cfg.model.gradient_checkpointing
    datamodule = instantiate(cfg.data)
    module = instantiate(cfg.model, video_shape=list(datamodule.video_shape), _convert_="all")
    trainer = build_trainer(cfg, build_layout(cfg.parallel))
    assert trainer.world_size == 4
    trainer.fit(module, datamodule=datamodule)
    return log_dir, module


def test_tp2_sp2_lora_matches_one_process_and_keeps_the_base(reference, tp2_sp2):
    ref_dir, ref_losses = reference
    log_dir, _ = tp2_sp2
    assert read_losses(log_dir) == pytest.approx(ref_losses[:3], rel=1e-9, abs=0)
    assert len(set(ref_losses)) == 4  # the adapters train: every step differs
    for report in base_reports(ref_dir, 1) + base_reports(log_dir, 4):
        assert report["all_equal"] and report["frozen"] == report["total"], report


@pytest.mark.parametrize(
    ("strategy", "devices", "batch_size"),
    [
        (VidParStrategy(ulysses=2, ring=2, data_parallel="fsdp"), 4, 2),
        (VidParStrategy(dp=2), 2, 1),
    ],
    ids=["fsdp2_ulysses2xring2", "ddp_dp2"],
)
def test_lora_layouts_match_one_process(
    reference, folders, tmp_path, strategy, devices, batch_size
):
    ref_losses = reference[1]
    fit(tmp_path, folders, strategy, devices, max_steps=3, batch_size=batch_size)
    assert read_losses(tmp_path) == pytest.approx(ref_losses[:3], rel=1e-9, abs=0)
    for report in base_reports(tmp_path, devices):
        assert report["all_equal"] and report["frozen"] == report["total"], report


def test_bf16_lora_with_gradient_checkpointing_trains_only_the_adapters(folders, tmp_path):
    module = fit(
        tmp_path,
        folders,
        "auto",
        1,
        max_steps=3,
        precision="bf16-true",
        gradient_checkpointing=True,
    )
    losses = read_losses(tmp_path)
    assert len(losses) == 3 and all(map(math.isfinite, losses)) and len(set(losses)) == 3
    (report,) = base_reports(tmp_path, 1)
    assert report["all_equal"] and report["frozen"] == report["total"], report
    adapters = lora_parameters(module.model)
    assert {p.dtype for p in adapters.values()} == {torch.bfloat16}
    assert all(p.any() for n, p in adapters.items() if n.endswith("lora_B.weight"))  # trained


def test_the_lora_module_holds_its_frozen_base_in_bf16_under_bf16_mixed(folders, tmp_path):
    """diffusers' LoRA scripts cast the frozen weights to half precision; vidpar holds the
    frozen linears' weights in autocast's dtype (the same numbers:
    ``tests/nn/test_frozen_weights.py``), its adapters in float32."""
    module = fit(tmp_path / "run", folders, "auto", 1, max_steps=2, precision="bf16-mixed")
    losses = read_losses(tmp_path / "run")
    assert len(losses) == 2 and all(map(math.isfinite, losses))
    (report,) = base_reports(tmp_path / "run", 1)  # the base as the folder's, cast
    assert report["all_equal"] and report["frozen"] == report["total"], report
    dtypes = {
        name: layer.weight.dtype
        for name, layer in module.model.named_modules()
        if isinstance(layer, AUTOCAST_MATMUL_LAYERS)
    }
    assert dtypes["blocks.0.attn1.to_q"] == torch.bfloat16  # a LoRA-adapted base
    assert dtypes["blocks.0.ffn.net.2"] == torch.bfloat16
    assert dtypes["condition_embedder.time_embedder.linear_1"] == torch.float32  # kept
    assert {p.dtype for p in lora_parameters(module.model).values()} == {torch.float32}


def test_fsdp2_shards_the_bf16_base_beside_float32_adapters_under_bf16_mixed(folders, tmp_path):
    """FSDP2 asks one dtype of a group's trainable parameters only: the frozen base held in
    bf16 and the float32 adapters shard, gather and train together over dp2."""
    strategy = VidParStrategy(dp=2, data_parallel="fsdp")
    fit(tmp_path, folders, strategy, 2, max_steps=2, batch_size=1, precision="bf16-mixed")
    losses = read_losses(tmp_path)
    assert len(losses) == 2 and all(map(math.isfinite, losses)) and losses[0] != losses[1]
    for report in base_reports(tmp_path, 2):
        assert report["all_equal"] and report["frozen"] == report["total"], report


def test_the_checkpoint_holds_adapters_only_and_resumes_at_tp1(
    reference, tp2_sp2, folders, tmp_path
):
    ckpt = tp2_sp2[0] / "checkpoints" / "last.ckpt"
    saved = FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    weights = [k for k in saved if k.startswith("model.")]
    assert weights and all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in weights)
    assert len(weights) == 2 * 2 * 10  # 2 blocks × (8 attention + 2 FFN linears) × A, B
    # Saved whole: B of a column-parallel layer, A of a row-parallel one.
    assert list(saved["model.model.blocks.0.attn1.to_q.lora_B.weight"].size) == [32, 2]
    assert list(saved["model.model.blocks.0.ffn.net.2.lora_A.weight"].size) == [2, 64]
    assert any(k.startswith("optimizer_0.state.") for k in saved)
    fit(tmp_path, folders, VidParStrategy(), 1, max_steps=4, ckpt_path=ckpt)
    assert read_losses(tmp_path) == pytest.approx(reference[1][3:], rel=1e-9, abs=0)


def test_the_exported_lora_loads_in_diffusers_and_vidpar_with_the_trained_output(
    tp2_sp2, folders, tmp_path
):
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    log_dir, trained = tp2_sp2  # adapters of step 3, back in this process
    out = export_lora(log_dir / "checkpoints" / "last.ckpt", tmp_path / "lora")
    assert out == tmp_path / "lora" / LORA_WEIGHTS
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, 2, 4, 4, generator=gen, dtype=torch.float64)
    t = torch.tensor([500.0], dtype=torch.float64)
    cond = torch.randn(1, 5, 32, generator=gen, dtype=torch.float64)

    def run(model):
        with torch.no_grad():
            return model(x, t, cond, return_dict=False)[0]

    expect = run(trained.model)
    base = load_pretrained(folders[0], dtype=torch.float64)
    pipe = WanPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=None,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        transformer=base,
    )
    plain = run(pipe.transformer)
    pipe.load_lora_weights(str(out.parent))
    assert pipe.get_list_adapters() == {"transformer": ["default_0"]}
    from_diffusers = run(pipe.transformer)
    assert (expect - plain).abs().max() > 1e-6  # the adapters do change the output
    torch.testing.assert_close(from_diffusers, expect, rtol=1e-9, atol=1e-12)

    merged = load_pretrained(folders[0], dtype=torch.float64)
    manager = LoraManager(merged)
    manager.set_adapter("trained", peft_to_adapter(out))
    manager.merge()
    torch.testing.assert_close(run(merged), expect, rtol=1e-9, atol=1e-12)


def test_bad_lora_settings_fail_before_any_work(folders, tmp_path):
    model_dir = str(folders[0])
    with pytest.raises(
        ValueError, match=r"rank 40 is larger than the smaller side of .*\[32, 32\]"
    ):
        DiffusersFlowModule(model_dir, lora={"rank": 40})
    with pytest.raises(ValueError, match=r"'to_qq': it matches no module.*blocks\.\*\.attn1\.to_q"):
        DiffusersFlowModule(model_dir, lora={"rank": 2, "targets": ["to_qq"]})
    with pytest.raises(ValueError, match=r"'norm1'.*FP32LayerNorm, not a linear layer"):
        DiffusersFlowModule(model_dir, lora={"rank": 2, "targets": ["norm1"]})
    with pytest.raises(ValueError, match=r"unknown lora settings \['ranks'\]"):
        DiffusersFlowModule(model_dir, lora={"ranks": 2})


def test_export_refuses_a_folder_with_other_contents(tp2_sp2, tmp_path):
    ckpt = tp2_sp2[0] / "checkpoints" / "last.ckpt"
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"exists and is not empty \(\['notes.txt'\]\)"):
        export_lora(ckpt, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    with pytest.raises(ValueError, match=r"holds LoRA adapters, not full weights.*export_lora"):
        export_diffusers(ckpt, tmp_path / "full")
    assert not (tmp_path / "full").exists()
