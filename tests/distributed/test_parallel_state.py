"""One road from the config to the groups: training and inference build the same
ParallelState, and the layout is constructed once per entry point."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

from vidpar.config import ParallelConfig
from vidpar.distributed import get_parallel_state
from vidpar.executor import Executor
from vidpar.lightning import VidParStrategy
from vidpar.nn import ColumnParallelLinear, DistributedAttention

#: Loaded by every Python process started with this folder first on PYTHONPATH (the
#: command, and its spawned workers): counts ParallelConfig constructions per process.
COUNTING_SITE = """
import atexit, json, multiprocessing, os, sys
from vidpar.config import ParallelConfig
from vidpar.distributed import get_parallel_state

_count = [0]
_original = ParallelConfig.__post_init__


def _counting(self):
    _count[0] += 1
    _original(self)


ParallelConfig.__post_init__ = _counting


def _report():
    name = multiprocessing.current_process().name
    if name.startswith("vidpar-worker"):
        role = "worker"
    elif sys.argv[0] not in ("-c", ""):  # not a helper such as multiprocessing's tracker
        role = "main"
    else:
        return
    path = os.path.join(os.environ["VIDPAR_COUNT_DIR"], f"{role}-{os.getpid()}.json")
    with open(path, "w") as f:
        json.dump({"role": role, "count": _count[0], "argv": sys.argv[:2]}, f)


atexit.register(_report)
"""

GENERATE = """
from vidpar import ParallelConfig
from vidpar.pipelines import VideoGenerator

if __name__ == "__main__":
    with VideoGenerator.from_checkpoint(
        "{checkpoint}", parallel=ParallelConfig(tp=2), devices="cpu"
    ) as gen:
        gen.generate([0], steps=1, show_progress=False)
"""


def _run(args: list[str], cwd: Path, counts: Path, site: Path) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
        "VIDPAR_COUNT_DIR": str(counts),
        "WANDB_MODE": "offline",
        "OMP_NUM_THREADS": "1",
    }
    done = subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def _counts(folder: Path) -> dict[str, list[int]]:
    found: dict[str, list[int]] = {"main": [], "worker": []}
    for path in folder.glob("*.json"):
        record = json.loads(path.read_text())
        found[record["role"]].append(record["count"])
    return found


def test_the_layout_is_built_once_per_entry_point(tmp_path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(COUNTING_SITE)
    train_counts, generate_counts = tmp_path / "train", tmp_path / "generate"
    train_counts.mkdir()
    generate_counts.mkdir()
    train = [
        "-m",
        "vidpar.cli.train",
        "parallel=tp2",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "data.num_train=16",
        "data.num_val=2",
        "model.num_sample_videos=0",
        "logger=none",
        "telemetry=off",
        "hydra.run.dir=run",
    ]
    _run(train, tmp_path, train_counts, site)
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    script = tmp_path / "generate.py"
    script.write_text(GENERATE.format(checkpoint=checkpoint))
    _run([str(script)], tmp_path, generate_counts, site)
    for counts in (_counts(train_counts), _counts(generate_counts)):
        assert len(counts["main"]) == 1 and len(counts["worker"]) == 2, counts
        assert counts["main"][0] <= 2, counts  # the command's layout (+ a world of one)
        assert all(c <= 1 for c in counts["worker"]), counts  # resolved at most once


class _TableModule(pl.LightningModule):
    """Writes each rank's rank → group table when the strategy has built the layout."""

    def __init__(self, out_dir: str) -> None:
        super().__init__()
        self.out_dir = out_dir
        self.layer = torch.nn.Linear(2, 1)

    def configure_model(self) -> None:
        state = get_parallel_state()
        # Layers that split over tp and ring (the strategy refuses a model without them).
        self.layer = ColumnParallelLinear(2, 2)
        self.attention = DistributedAttention()
        if not state.is_single:  # also called in the main process, to receive the weights
            path = Path(self.out_dir) / f"{state.rank}.json"
            path.write_text(json.dumps(state.rank_table()))

    def training_step(self, batch, batch_idx):
        return self.layer(batch).sum()

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.ones(2, 2), batch_size=1)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _rank_table(worker) -> dict[str, list[int]]:
    return worker.state.rank_table()


def test_training_and_inference_build_the_same_groups(tmp_path) -> None:
    layout = ParallelConfig(tp=2, ring=2)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=4,
        strategy=VidParStrategy(parallel=layout),
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    trainer.fit(_TableModule(str(tmp_path)))
    trained = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(4)]
    with Executor(layout, devices="cpu") as executor:
        inferred = executor.collective_rpc(_rank_table)
    assert trained == inferred
    assert inferred[1]["tp"] == [0, 1] and inferred[1]["ring"] == [1, 3]
    assert inferred[2]["sp"] == [0, 2] and inferred[3]["world"] == [0, 1, 2, 3]
