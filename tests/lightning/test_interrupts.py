"""Graceful interrupts with real signals: SIGTERM to every process of a real vidpar-train
run (as SLURM sends it) and the first Ctrl-C of a Trainer run save a checkpoint at the
current step and fail with a message naming it; the run resumes from it; a second Ctrl-C
stops everything at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import lightning.pytorch as pl
import psutil
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.trainer.states import TrainerStatus

from vidpar.distributed.checkpoint import TRAINER_STATE, is_complete
from vidpar.lightning import TrainingInterrupted, VidParStrategy

#: A tiny sp2 run that would go on for long: it is interrupted well before its end.
TRAIN = [
    "parallel=sp2",
    "trainer.max_steps=100000",
    "trainer.val_check_interval=100000",
    "data.num_train=48",
    "model.num_sample_videos=0",
    "logger=none",
    "telemetry=off",
    "checkpoint.every_n_train_steps=2",
]
#: Generous bounds for a loaded 2-core machine.
START_S = 300.0
EXIT_S = 120.0


def start_train(cwd: Path, *overrides: str) -> tuple[subprocess.Popen, Path]:
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    log = cwd / "console.txt"
    proc = subprocess.Popen(
        [sys.executable, "-m", "vidpar.cli.train", *overrides],
        cwd=cwd,
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,  # a process group of its own, as a terminal job has
    )
    return proc, log


def wait_for(condition, timeout: float, what: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"{what}: not seen; console:\n{log.read_text()[-4000:]}")
        time.sleep(0.1)


def tree(proc: subprocess.Popen) -> list[psutil.Process]:
    root = psutil.Process(proc.pid)
    return [root, *root.children(recursive=True)]


def alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    left = []
    for p in processes:
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                left.append(p)
        except psutil.NoSuchProcess:
            pass
    return left


def saved_step(ckpt: Path) -> int:
    return torch.load(ckpt / TRAINER_STATE, weights_only=False)["global_step"]


def test_sigterm_to_every_process_saves_the_step_and_the_run_resumes(tmp_path):
    proc, log = start_train(tmp_path, *TRAIN, "hydra.run.dir=run")
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    wait_for(lambda: is_complete(last), START_S, "a first checkpoint", proc, log)
    processes = tree(proc)
    assert len(processes) >= 3  # the main process, 2 workers (and the reaper)
    for p in processes:  # what SLURM does on preemption
        p.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=EXIT_S) == 128 + signal.SIGTERM, log.read_text()[-4000:]
    console = log.read_text()
    line = next(x for x in console.splitlines() if "training interrupted by SIGTERM" in x)
    step = int(line.split("at global step ")[1].split(";")[0])
    assert f"checkpoint saved to {last}" in line
    assert is_complete(last) and saved_step(last) == step
    assert 2 <= step < 100000  # the step of the first save, or a later one
    deadline = time.monotonic() + 30
    while alive(processes) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(processes)

    resumed, log2 = start_train(
        tmp_path,
        *TRAIN,
        f"trainer.max_steps={step + 2}",
        f"checkpoint.every_n_train_steps={step + 2}",
        f"ckpt_path={last}",
        "hydra.run.dir=again",
    )
    assert resumed.wait(timeout=START_S) == 0, log2.read_text()[-4000:]
    assert f"Restored all states from the checkpoint at {last}" in log2.read_text()
    assert saved_step(tmp_path / "again" / "checkpoints" / "last.ckpt") == step + 2


def test_a_second_ctrl_c_stops_at_once(tmp_path):
    proc, log = start_train(tmp_path, *TRAIN, "hydra.run.dir=run")
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    wait_for(lambda: is_complete(last), START_S, "a first checkpoint", proc, log)
    processes = tree(proc)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the job's group
    wait_for(lambda: "SIGINT received" in log.read_text(), EXIT_S, "the first Ctrl-C", proc, log)
    os.killpg(proc.pid, signal.SIGINT)
    pressed = time.monotonic()
    code = proc.wait(timeout=EXIT_S)
    print(f"second Ctrl-C: exit after {time.monotonic() - pressed:.1f} s")
    assert code == 1, log.read_text()[-4000:]  # Lightning's exit on KeyboardInterrupt
    assert "training interrupted" not in log.read_text()  # it did not wait to save
    deadline = time.monotonic() + 30
    while alive(processes) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(processes)


class MarkingModel(BoringModel):
    """Rank 0 writes a marker from global step 2 on."""

    def __init__(self, marker: str) -> None:
        super().__init__()
        self.marker = marker

    def training_step(self, batch, batch_idx):
        if self.global_step >= 2 and self.global_rank == 0:
            Path(self.marker).touch()
        return super().training_step(batch, batch_idx)


def test_the_first_ctrl_c_saves_a_trainer_run_at_its_step(tmp_path):
    marker = tmp_path / "step2"
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=VidParStrategy(dp=2),
        max_steps=100000,
        max_epochs=-1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=0, save_last=True)],
    )
    before = signal.getsignal(signal.SIGINT)

    def press_ctrl_c() -> None:
        deadline = time.monotonic() + START_S
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)

    presser = threading.Thread(target=press_ctrl_c, daemon=True)
    presser.start()
    with pytest.raises(TrainingInterrupted) as info:
        trainer.fit(MarkingModel(str(marker)))
    presser.join()
    err = info.value
    assert err.signum == signal.SIGINT and err.step >= 2
    assert err.checkpoint == str(tmp_path / "ckpt" / "last.ckpt")
    assert is_complete(Path(err.checkpoint)) and saved_step(Path(err.checkpoint)) == err.step
    assert f"interrupted by SIGINT at global step {err.step}" in str(err)
    assert trainer.state.status == TrainerStatus.INTERRUPTED
    assert signal.getsignal(signal.SIGINT) is before  # the launcher's handler is gone
