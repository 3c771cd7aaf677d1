"""Lightning pieces of the ``train`` and ``telemetry`` suites: a residual-MLP regression
module that runs under any of the compared strategies, a step timer and a telemetry
toggle. Importable by Executor workers (module-level classes)."""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from vidpar.distributed import telemetry


class RandomTokens(Dataset):
    """``n`` samples of ``(x, y)``, each ``[seq_len, hidden]``, cycling through 32 fixed
    random ones (cheap to serve, so the step time is the model's)."""

    def __init__(self, n: int, seq_len: int, hidden: int, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.n = n
        self.x = torch.randn(32, seq_len, hidden, generator=gen)
        self.y = torch.randn(32, seq_len, hidden, generator=gen)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[index % 32], self.y[index % 32]


class MLPBlock(nn.Module):
    """``x + fc2(gelu(fc1(norm(x))))``: the MLP half of a transformer block."""

    def __init__(self, norm: nn.Module, fc1: nn.Module, fc2: nn.Module) -> None:
        super().__init__()
        self.norm, self.fc1, self.fc2 = norm, fc1, fc2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(self.norm(x)), approximate="tanh"))


class MLPRegression(pl.LightningModule):
    """Residual MLP blocks on ``[B, S, hidden]`` tokens with an MSE loss.

    ``impl="torch"``: ``nn.Linear`` layers; under ``ModelParallelStrategy`` each block is
    split with torch's TP plan (``ColwiseParallel`` fc1, ``RowwiseParallel`` fc2).
    ``impl="vidpar"``: vidpar's ``ColumnParallelLinear``/``RowParallelLinear``, split over
    the layout's tp group (plain linears when tp is 1). Both do the same arithmetic and
    the same communication per block (one all-reduce forward, one backward).
    """

    def __init__(
        self,
        hidden: int = 256,
        layers: int = 4,
        seq_len: int = 32,
        global_batch: int = 16,
        num_samples: int = 1024,
        impl: str = "torch",
        lr: float = 1e-3,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if impl not in ("torch", "vidpar"):
            raise ValueError(f"impl must be torch or vidpar, got {impl!r}")
        self.save_hyperparameters()
        self.blocks: nn.ModuleList | None = None

    def configure_model(self) -> None:
        if self.blocks is not None:
            return
        hp = self.hparams
        torch.manual_seed(hp.seed)
        h = hp.hidden
        blocks = []
        for _ in range(hp.layers):
            if hp.impl == "vidpar":
                from vidpar.nn import ColumnParallelLinear, RowParallelLinear

                fc1, fc2 = ColumnParallelLinear(h, 4 * h), RowParallelLinear(4 * h, h)
            else:
                fc1, fc2 = nn.Linear(h, 4 * h), nn.Linear(4 * h, h)
            blocks.append(MLPBlock(nn.LayerNorm(h), fc1, fc2))
        self.blocks = nn.ModuleList(blocks)
        mesh = getattr(self, "_device_mesh", None)
        if (
            hp.impl == "torch"
            and mesh is not None
            and "tensor_parallel" in (mesh.mesh_dim_names or ())
        ):
            from torch.distributed.tensor.parallel import (
                ColwiseParallel,
                RowwiseParallel,
                parallelize_module,
            )

            plan = {"fc1": ColwiseParallel(), "fc2": RowwiseParallel()}
            for block in self.blocks:
                parallelize_module(block, mesh["tensor_parallel"], plan)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        x, y = batch
        loss = F.mse_loss(self(x), y)
        self.last_loss = loss.detach()
        return loss

    def train_dataloader(self) -> DataLoader:
        replicas = self.trainer.strategy.distributed_sampler_kwargs or {"num_replicas": 1}
        hp = self.hparams
        dataset = RandomTokens(hp.num_samples, hp.seq_len, hp.hidden, hp.seed)
        return DataLoader(dataset, batch_size=hp.global_batch // replicas["num_replicas"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


class StepTimer(pl.Callback):
    """Wall time of every training step, from one ``on_train_batch_start`` to the next
    (the last step ends at its ``on_train_batch_end``), and the process CPU time over
    the same spans. On CUDA it synchronises at each mark so a step's time includes its
    GPU work."""

    def __init__(self) -> None:
        self.marks: list[float] = []
        self.cpu_marks: list[float] = []
        self.end = self.cpu_end = 0.0

    def _now(self, pl_module: pl.LightningModule) -> tuple[float, float]:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        return time.perf_counter(), time.process_time()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        wall, cpu = self._now(pl_module)
        self.marks.append(wall)
        self.cpu_marks.append(cpu)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.end, self.cpu_end = self._now(pl_module)

    @staticmethod
    def _spans(marks: list[float], end: float) -> list[float]:
        return [e - s for s, e in zip(marks, [*marks[1:], end], strict=True)]

    @property
    def step_seconds(self) -> list[float]:
        return self._spans(self.marks, self.end)

    @property
    def step_cpu_seconds(self) -> list[float]:
        return self._spans(self.cpu_marks, self.cpu_end)

    def result(self, skip: int) -> dict[str, Any]:
        """Steps per second after the first ``skip`` steps, and the median step time."""
        steps = len(self.marks)
        if steps <= skip:
            raise ValueError(f"only {steps} steps ran; need more than skip={skip}")
        return {
            "steps": steps,
            "timed_steps": steps - skip,
            "steps_per_s": (steps - skip) / (self.end - self.marks[skip]),
            "median_step_s": statistics.median(self.step_seconds[skip:]),
            "median_step_cpu_s": statistics.median(self.step_cpu_seconds[skip:]),
            "step_seconds": self.step_seconds,
            "step_cpu_seconds": self.step_cpu_seconds,
        }


class TelemetryToggle(pl.Callback):
    """Turns collective recording on and off step by step, in blocks of (on, off, off,
    on) that cancel linear drift, into the recorder that
    :class:`~vidpar.lightning.CollectiveTelemetry` set up. List it before that callback:
    it counts each step's records before the callback drains them."""

    PATTERN = (True, False, False, True)

    def __init__(self) -> None:
        self.recorder: telemetry.CollectiveRecorder | None = None
        self.on_steps: list[bool] = []
        self.records: list[int] = []

    def on_train_start(self, trainer, pl_module) -> None:
        self.recorder = telemetry.active_recorder()
        if self.recorder is None:
            raise RuntimeError("TelemetryToggle needs an active recorder (CollectiveTelemetry)")
        self.recorder.clear()  # set-up collectives (replica broadcasts) are not steps

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        on = self.PATTERN[len(self.on_steps) % len(self.PATTERN)]
        self.on_steps.append(on)
        if on:
            telemetry.start_recording(self.recorder)
        else:
            telemetry.stop_recording()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.records.append(len(self.recorder.records))

    def on_train_end(self, trainer, pl_module) -> None:
        telemetry.start_recording(self.recorder)  # CollectiveTelemetry stops it at teardown


def quiet_lightning() -> None:
    """Keep Lightning's per-fit chatter (devices, tips) out of the tables; the LeafSpec
    deprecation is filtered by ``vidpar.lightning``, which every suite's workers import."""
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)


def restore_worker_environment(worker) -> None:
    """Lightning's cluster environment removes ``WORLD_SIZE`` at teardown; put the
    worker's rendezvous variables back before the next Trainer."""
    from vidpar.executor.worker import worker_environment

    os.environ.update(worker_environment(worker.spec, worker.rank))
