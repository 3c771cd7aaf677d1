"""A DiffusersFlowModule that records its losses (importable by spawned workers)."""

from __future__ import annotations

import json
from pathlib import Path

from vidpar.lightning import DiffusersFlowModule


class RecordingDiffusersModule(DiffusersFlowModule):
    """Appends each step's global loss to ``<log_dir>/losses.json`` (global rank 0)."""

    def __init__(self, log_dir: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.log_dir = log_dir
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch, self.global_step)
        self.losses.append(float(self.trainer.strategy.reduce(loss.detach(), reduce_op="mean")))
        return loss

    def on_train_end(self) -> None:
        if self.trainer.is_global_zero:
            path = Path(self.log_dir) / "losses.json"
            previous = json.loads(path.read_text()) if path.exists() else []
            path.write_text(json.dumps(previous + self.losses))


class BaseCheckingLoraModule(RecordingDiffusersModule):
    """Also writes, per rank, whether every frozen base weight still equals (bit for bit)
    this rank's shard of the model folder's, loaded afresh (``base_<rank>.json``)."""

    def on_train_end(self) -> None:
        import torch
        from torch.distributed.tensor import DTensor

        from vidpar.models import parallelize
        from vidpar.models.pretrained import load_pretrained

        super().on_train_end()
        fresh = parallelize(load_pretrained(self.folder)).state_dict()
        frozen = {n: p for n, p in self.model.named_parameters() if not p.requires_grad}
        same = [
            torch.equal(p.full_tensor() if isinstance(p, DTensor) else p.data, fresh[n].to(p))
            for n, p in frozen.items()
        ]
        rank = self.trainer.global_rank
        report = {"frozen": len(frozen), "all_equal": all(same), "total": len(fresh)}
        (Path(self.log_dir) / f"base_{rank}.json").write_text(json.dumps(report))
