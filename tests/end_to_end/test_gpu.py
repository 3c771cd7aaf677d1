"""CUDA paths: NCCL worlds, the DiT in bf16 against float32, a Trainer on GPU, and the
Executor generating on GPU. Marked ``gpu``: skipped where CUDA is absent; tests that need
several GPUs also skip on machines with fewer."""

from __future__ import annotations

import pytest
import torch

from vidpar.config import ParallelConfig
from vidpar.distributed.full_weights import full_state_dict, load_full_state_dict
from vidpar.executor import Executor
from vidpar.nn.dit import DiTConfig, VideoDiT

pytestmark = pytest.mark.gpu

GPU_DIT = DiTConfig(
    in_channels=4, patch_size=(1, 2, 2), hidden_size=128, num_heads=8, depth=2, num_classes=4
)


def needs_gpus(n: int):
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return pytest.mark.skipif(count < n, reason=f"needs {n} GPUs, found {count}")


def _random_dit(config: DiTConfig) -> VideoDiT:
    torch.manual_seed(0)
    model = VideoDiT(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model


def _inputs(device: str, dtype=torch.float32):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 4, 16, 16, generator=gen).to(device, dtype)
    t = torch.rand(2, generator=gen).to(device)
    return x, t, torch.tensor([1, 3], device=device)


def test_dit_bf16_on_gpu_is_close_to_float32() -> None:
    model = _random_dit(GPU_DIT).cuda()
    x, t, y = _inputs("cuda")
    with torch.no_grad():
        ref = model(x, t, y).float()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x, t, y).float()
    rel = (out - ref).norm() / ref.norm()
    assert rel < 2e-2, rel


def _compiled_step(checkpointing: bool | str) -> tuple[list[torch.Tensor], int]:
    """Gradients of a compiled bf16 step under ``checkpointing``, and how many fused
    attention forwards it ran (torch.profiler's aten events)."""
    config = DiTConfig(
        **{**vars(GPU_DIT), "compile": True, "activation_checkpointing": checkpointing}
    )
    model = _random_dit(config).cuda().to(torch.bfloat16)
    x, t, y = _inputs("cuda", torch.bfloat16)
    model(x, t, y).float().square().mean().backward()  # compile first
    model.zero_grad()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        model(x, t, y).float().square().mean().backward()
    forwards = sum(
        e.count
        for e in prof.key_averages()
        if e.key.startswith("aten::_scaled_dot_product_") and "backward" not in e.key
    )
    return [p.grad.float() for p in model.parameters()], forwards


def test_keep_attention_compiled_on_gpu_skips_the_attention_rerun() -> None:
    """Inductor on CUDA: keep_attention's gradients equal full checkpointing's (bf16), with
    one self-attention forward less per block."""
    full, full_forwards = _compiled_step(True)
    kept, kept_forwards = _compiled_step("keep_attention")
    assert kept_forwards == full_forwards - GPU_DIT.depth, (kept_forwards, full_forwards)
    for a, b in zip(kept, full, strict=True):
        assert (a - b).norm() <= 2e-2 * b.norm() + 1e-6


def _parallel_forward(worker, state: dict, kind: str) -> torch.Tensor | None:
    model = VideoDiT(GPU_DIT).to(worker.device)
    load_full_state_dict(model, state)
    x, t, y = _inputs(str(worker.device))
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=kind == "bf16"):
        out = model(x, t, y).float().cpu()
    return out if worker.rank == 0 else None


@needs_gpus(2)
@pytest.mark.parametrize(
    "layout", [ParallelConfig(sp=2), ParallelConfig(tp=2), ParallelConfig(ring=2)], ids=str
)
def test_dit_on_two_gpus_in_bf16_matches_float32_reference(layout: ParallelConfig) -> None:
    model = _random_dit(GPU_DIT)
    state = full_state_dict(model)
    x, t, y = _inputs("cpu")
    with torch.no_grad():
        ref = model.cuda()(x.cuda(), t.cuda(), y.cuda()).float().cpu()
    with Executor(layout, devices="cuda") as executor:
        out = executor.collective_rpc(_parallel_forward, state, "bf16")[0]
    assert (out - ref).norm() / ref.norm() < 2e-2


def _all_ops_on_gpu(worker, communicator: str) -> bool:
    from test_collectives import check_every_op_on_every_group
    from vidpar.distributed import state as ps

    tp = ps.get_tp_group().communicator
    # auto keeps multi-rank pynccl off until validated; pynccl forces it for every op
    assert (getattr(tp, "pynccl", None) is not None) == (communicator == "pynccl"), tp
    return bool(check_every_op_on_every_group())


@needs_gpus(2)
@pytest.mark.parametrize("communicator", ["auto", "pynccl"])
def test_every_group_op_on_two_gpus(communicator: str) -> None:
    with Executor(ParallelConfig(tp=2), devices="cuda", communicator=communicator) as executor:
        assert all(executor.collective_rpc(_all_ops_on_gpu, communicator))


def test_trainer_on_gpu_with_vidpar(tmp_path) -> None:
    import lightning.pytorch as pl

    from lightning_models import RecordingDiT
    from vidpar.lightning import VidParStrategy

    model = RecordingDiT(str(tmp_path))
    trainer = pl.Trainer(
        accelerator="gpu",
        devices=1,
        strategy=VidParStrategy(),
        max_steps=3,
        precision="bf16-mixed",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
    )
    trainer.fit(model)
    assert trainer.global_step == 3
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_executor_generates_a_video_on_gpu(tmp_path) -> None:
    from vidpar.pipelines import VideoGenerator, export_weights

    config = DiTConfig(
        in_channels=3, patch_size=(1, 2, 2), hidden_size=32, num_heads=4, depth=1, num_classes=4
    )
    path = export_weights(
        _random_dit(config), tmp_path / "tiny.safetensors", {"video_shape": [3, 4, 8, 8]}
    )
    layout = ParallelConfig(cfg=2) if torch.cuda.device_count() >= 2 else ParallelConfig()
    with VideoGenerator.from_checkpoint(path, parallel=layout, devices="cuda") as gen:
        frames = gen.generate([0, 1], steps=4, seed=0, output=tmp_path / "gpu.gif")
    assert frames.shape == (2, 4, 8, 8, 3)
    assert (tmp_path / "gpu.gif").is_file()
