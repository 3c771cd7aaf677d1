"""Diffusers models on CUDA: DiffusersFlowModule training in bf16 (the tiny Wan with a
mid-run checkpoint, and one Wan2.1-1.3B-sized step at 32,760 tokens), and
DiffusersVideoGenerator in bf16 against float32 with VAE decoding. Marked ``gpu``."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from vidpar.config import ParallelConfig
from vidpar.data import write_latents_folder
from vidpar.models.testing import make_tiny_latents, make_tiny_wan, make_tiny_wan_vae

pytestmark = pytest.mark.gpu

#: Wan2.1-T2V-1.3B's transformer config (random weights here).
WAN_1P3B = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 12,
    "attention_head_dim": 128,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 4096,
    "freq_dim": 256,
    "ffn_dim": 8960,
    "num_layers": 30,
}


class StepTimer(Callback):
    """Writes ``{"per_step": s, "peak_gib": GiB}`` to ``path`` at the end of training (from
    global rank 0, in the worker): the mean time of the steps after the first, and the
    peak CUDA memory."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.starts: list[float] = []

    def _now(self) -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_start(self, trainer, pl_module) -> None:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def on_train_batch_start(self, *args) -> None:
        self.starts.append(self._now())

    def on_train_end(self, trainer, pl_module) -> None:
        starts = [*self.starts, self._now()]
        per_step = (starts[-1] - starts[1]) / max(1, len(starts) - 2)
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
        if trainer.is_global_zero:
            Path(self.path).write_text(json.dumps({"per_step": per_step, "peak_gib": peak}))


def train(tmp_path, model_dir, latents_dir, steps: int, save: bool = False, accelerator="gpu"):
    """``steps`` bf16-mixed steps of DiffusersFlowModule with gradient checkpointing under
    VidParStrategy on one device; the trained module and the StepTimer's numbers."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    from vidpar.data import LatentsDataModule
    from vidpar.lightning import DiffusersFlowModule, VidParStrategy

    callbacks = [StepTimer(str(tmp_path / "timing.json"))]
    if save:
        callbacks.append(
            ModelCheckpoint(
                dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0, every_n_train_steps=1
            )
        )
    module = DiffusersFlowModule(str(model_dir), lr=1e-5, gradient_checkpointing=True)
    trainer = pl.Trainer(
        accelerator=accelerator,
        devices=1,
        strategy=VidParStrategy(),
        max_steps=steps,
        precision="bf16-mixed",
        logger=False,
        callbacks=callbacks,
        enable_checkpointing=save,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=LatentsDataModule(str(latents_dir), batch_size=1))
    assert trainer.global_step == steps
    return module, json.loads((tmp_path / "timing.json").read_text())


def test_tiny_wan_trains_in_bf16_on_gpu_with_a_checkpoint_every_step(tmp_path) -> None:
    model_dir = make_tiny_wan(tmp_path / "tiny-wan")
    latents = make_tiny_latents(tmp_path / "latents", model_dir)
    module, _ = train(tmp_path, model_dir, latents, steps=3, save=True)
    assert all(torch.isfinite(p).all() for p in module.model.parameters())
    assert (tmp_path / "ckpt" / "last.ckpt" / "trainer_state.pt").is_file()


def test_wan_1p3b_sized_trains_on_one_gpu_at_32760_tokens(tmp_path) -> None:
    """The wan2_1_t2v_1p3b recipe's model and sample size: 21 × 60 × 104 latents (81 frames
    of 480 × 832), 512 prompt tokens, gradient checkpointing, bf16-mixed. Prints the time
    per step and the peak memory."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    WanTransformer3DModel(**WAN_1P3B).save_pretrained(str(tmp_path / "wan-1p3b"))
    gen = torch.Generator().manual_seed(0)
    write_latents_folder(
        tmp_path / "latents",
        torch.randn((2, 16, 21, 60, 104), generator=gen),
        torch.randn((2, 512, 4096), generator=gen),
    )
    _, timing = train(tmp_path, tmp_path / "wan-1p3b", tmp_path / "latents", steps=3)
    print(
        f"\nWan2.1-1.3B-sized DiffusersFlowModule, 32,760 tokens, bf16-mixed, gradient "
        f"checkpointing: {timing['per_step']:.2f} s/step, peak {timing['peak_gib']:.1f} GiB"
    )
    assert 0 < timing["peak_gib"] < 100


def test_generator_in_bf16_on_gpu_is_close_to_float32_and_decodes(tmp_path) -> None:
    from vidpar.pipelines import DiffusersVideoGenerator, read_video

    model_dir = make_tiny_wan(tmp_path / "tiny-wan")
    vae = make_tiny_wan_vae(tmp_path / "tiny-wan-vae")
    latents = make_tiny_latents(tmp_path / "latents", model_dir)
    prompt = latents / "000000.safetensors"
    layout = ParallelConfig(cfg=2) if torch.cuda.device_count() >= 2 else ParallelConfig()
    video = {"num_frames": 5, "height": 12, "width": 12, "steps": 4, "seed": 0}
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        with DiffusersVideoGenerator(model_dir, layout, vae=vae, dtype=dtype, devices="cuda") as g:
            out[dtype] = g.generate(prompt, **video, output_type="latent")
            if dtype == torch.bfloat16:
                frames = g.generate(prompt, **video, output=tmp_path / "gpu.mp4")
    ref = out[torch.float32]
    assert (out[torch.bfloat16] - ref).norm() / ref.norm() < 3e-2
    assert frames.shape == (1, 5, 12, 12, 3) and read_video(tmp_path / "gpu.mp4").shape[0] == 5
