"""Every layout survives a mid-run save: in a real 2-process world, training after a
sharded save goes on exactly as without it, and the saved state resumes to the same
weights (tp, Ulysses sp, Ring, cfg, dp with DDP, dp with FSDP2)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_models import TINY_DIT
from vidpar.config import ParallelConfig
from vidpar.distributed import state as ps
from vidpar.distributed.checkpoint import load_sharded, save_sharded
from vidpar.lightning.grad_reduction import reduce_over_replicas
from vidpar.nn.dit import VideoDiT
from vidpar.pipelines.flow_matching import flow_matching_loss

LAYOUTS = {
    "tp2": (ParallelConfig(tp=2), "ddp"),
    "ulysses2": (ParallelConfig(sp=2), "ddp"),
    "ring2": (ParallelConfig(ring=2), "ddp"),
    "cfg2": (ParallelConfig(cfg=2), "ddp"),
    "dp2": (ParallelConfig(dp=2), "ddp"),
    "fsdp_dp2": (ParallelConfig(dp=2), "fsdp"),
}


class Holder(torch.nn.Module):
    """The network as a LightningModule holds it (FSDP2 shards each child, then the root)."""

    def __init__(self) -> None:
        super().__init__()
        self.model = VideoDiT(TINY_DIT).double()

    def forward(self, *args):
        return self.model(*args)


class Trained:
    """The tiny DiT (float64) wrapped for its layout as VidParStrategy wraps it, and AdamW."""

    def __init__(self, data_parallel: str) -> None:
        torch.manual_seed(0)
        self.module = Holder()
        self.net = reduce_over_replicas(self.module, ps.get_parallel_state(), data_parallel)
        self.optimizer = torch.optim.AdamW(self.module.parameters(), lr=1e-2)

    def step(self, step: int) -> None:
        gen = torch.Generator().manual_seed(step)
        x0 = torch.randn(2, 3, 2, 8, 8, generator=gen, dtype=torch.float64)
        noise = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
        t = torch.rand(2, generator=gen, dtype=torch.float64)
        loss = flow_matching_loss(self.net, x0, torch.tensor([1, 2]), t=t, noise=noise)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()

    def local_state(self) -> dict[str, torch.Tensor]:
        """Weights and Adam moments of this rank (shards as they are)."""
        out = {}
        for name, value in self.module.state_dict().items():
            out[name] = _local(value)
        for i, moments in self.optimizer.state_dict()["state"].items():
            for key in ("exp_avg", "exp_avg_sq"):
                out[f"optimizer.{i}.{key}"] = _local(moments[key])
        return out


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return (tensor.to_local() if hasattr(tensor, "to_local") else tensor).detach().clone()


def train_save_train(directory: str, data_parallel: str) -> list[str]:
    """Three steps with a save after the first, three without, and a resume of the save
    for two steps: the names of what differs from the run without a save."""
    path = ps.get_world_group().broadcast_object(directory) + "/last.ckpt"
    saving, plain = Trained(data_parallel), Trained(data_parallel)
    saving.step(0)
    save_sharded(Path(path), saving.module, [saving.optimizer], {"step": 1})
    for step in (1, 2):
        saving.step(step)
    for step in (0, 1, 2):
        plain.step(step)
    resumed = Trained(data_parallel)
    assert load_sharded(Path(path), resumed.module, [resumed.optimizer]) == {"step": 1}
    for step in (1, 2):
        resumed.step(step)
    expect = plain.local_state()
    differ = []
    for label, run in (("after a save", saving), ("resumed", resumed)):
        got = run.local_state()
        assert got.keys() == expect.keys(), (label, sorted(got.keys() ^ expect.keys()))
        differ += [
            f"{label}: {name}"
            for name in expect
            if not torch.allclose(got[name], expect[name], rtol=1e-12, atol=0)
        ]
    return differ


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_training_after_a_save_and_a_resume_of_it_match_the_run_without(worlds, tmp_path, name):
    layout, data_parallel = LAYOUTS[name]
    for differ in worlds(2).run(train_save_train, str(tmp_path), data_parallel, layout=layout):
        assert differ == []
