"""What a new user sees of a run: a sweep's jobs as W&B runs of their own, train.log holding
the console (workers' lines, losses, the summary, warnings, tracebacks) as plain text, a
step-based progress bar, and vidpar-generate taking the last training run."""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import pytest

from test_hydra_cli import run_cli
from vidpar.cli.hydra_setup import UserError
from vidpar.cli.validation_generate import find_checkpoint
from vidpar.distributed.checkpoint_store import resolve
from wandb_offline import read_run

#: Lines of third-party noise that must reach neither the console nor a log.
NOISE = ["litlogger", "anonymous setting has no effect", "wandb.require('service')"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> tuple[Path, str, str]:
    """``vidpar-train -m parallel=single,sp2`` of 3 steps, logging to offline W&B: Hydra
    runs the two jobs one after another in this one process. Its directory and console."""
    cwd = tmp_path_factory.mktemp("sweep")
    result = run_cli(
        "vidpar.cli.train",
        "-m",
        "parallel=single,sp2",
        "trainer.max_steps=3",
        "trainer.val_check_interval=3",
        "trainer.log_every_n_steps=1",
        "data.num_train=24",
        "model.num_sample_videos=0",
        "hydra.sweep.dir=sweep",
        cwd=cwd,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return cwd / "sweep", result.stdout, result.stderr


def test_each_sweep_job_is_a_wandb_run_of_its_own(sweep) -> None:
    root, stdout, stderr = sweep
    assert "already in progress" not in stdout + stderr
    runs = []
    for job in ("0", "1"):
        (run_dir,) = (root / job / "wandb").glob("offline-run-*")  # under the job's own dir
        runs.append(read_run(run_dir))
    assert runs[0].id != runs[1].id
    assert [r.name for r in runs] == ["parallel=single", "parallel=sp2"]  # the swept override
    for run in runs:
        # One series of steps per run: 0, 1, 2 once each (merged runs would repeat them).
        losses = [row["trainer/global_step"] for row in run.history if "train/loss" in row]
        assert losses == [0, 1, 2], (run.name, losses)
        assert [row["_step"] for row in run.history] == list(range(len(run.history)))
    # single has no collectives to log; sp2's all-to-alls are in its own run only.
    keys = [{k for row in run.history for k in row} for run in runs]
    assert not any(k.startswith("comm") for k in keys[0])
    assert {"comm_val/ulysses/all_to_all/calls", "comm/summary/_type"} <= keys[1]


def test_sweep_jobs_reach_the_same_loss(sweep) -> None:
    _, stdout, _ = sweep
    losses = [line for line in stdout.splitlines() if "final train/loss" in line]
    assert len(losses) == 2 and losses[0] == losses[1], losses


def test_train_log_holds_the_console_as_plain_text(sweep) -> None:
    root, stdout, stderr = sweep
    logs = [(root / job / "train.log").read_text() for job in ("0", "1")]
    for job, log in enumerate(logs):
        assert f"output in {root.resolve() / str(job)}" in log  # vidpar's lines
        for step in (1, 2, 3):
            assert re.search(rf"^step {step}/3: train/loss \d+\.\d{{4}}$", log, re.M), log
        # The step-based bar's last draw, from a worker: steps of max_steps, rate, loss.
        bar = r"^Training: 100%.*\| 3/3 \[[\d:]+<[\d:]+, +[\d.]+(it/s|s/it), train/loss="
        assert re.search(bar, log, re.M), log
        assert "Epoch 0/" not in log and "/999" not in log
        assert "`Trainer.fit` stopped: `max_steps=3` reached." in log  # a worker's stderr
        assert "vidpar: checkpoint" in log and "wandb: Run data is saved locally" in log
        assert "\x1b" not in log and "\r" not in log
    assert "Communication summary (rank 0, whole fit):" in logs[1]
    assert re.search(r"^ulysses +all_to_all +\d+", logs[1], re.M)  # the summary table
    console = stdout + stderr
    assert "\x1b" not in console and "\r" not in console  # not a terminal: plain lines
    for noise in NOISE:
        assert noise not in console and noise not in logs[0] + logs[1], noise
    # Every line the console showed during the jobs is in one of their logs.
    shown = {line for line in console.splitlines() if line.strip() and "[HYDRA]" not in line}
    kept = set(logs[0].splitlines()) | set(logs[1].splitlines())
    assert shown - kept == set()


def test_warnings_and_tracebacks_reach_the_log(tmp_path) -> None:
    """A real failure after a warning: fp16 on CPU (Lightning warns and uses bf16), then a
    logger setting W&B does not know."""
    result = run_cli(
        "vidpar.cli.train",
        "parallel=single",
        "trainer.precision=16-mixed",
        "+logger.no_such_setting=1",
        "hydra.run.dir=run",
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 1
    log = (tmp_path / "run" / "train.log").read_text()
    assert "AMP with fp16 is not supported on CPU" in log
    assert "Traceback (most recent call last):" in log
    assert 'File "' in log and "launcher.py" in log  # the full stack, vidpar's frames too
    assert "unexpected keyword argument 'no_such_setting'" in log.splitlines()[-1]


def test_generate_takes_the_last_training_run_with_a_checkpoint(sweep, tmp_path, capsys) -> None:
    root, _, _ = sweep
    first, last = tmp_path / "a", tmp_path / "b"
    shutil.copytree(root / "0", first, symlinks=True)
    shutil.copytree(root / "1", last, symlinks=True)
    now = time.time()
    for age, run in ((200, last), (100, first)):  # `first` started last, though older
        os.utime(run / ".hydra" / "hydra.yaml", (now - age, now - age))
    os.utime(first / "checkpoints", (0, 0))  # whatever the checkpoints' own ages
    assert find_checkpoint(None, str(tmp_path)) == resolve(first / "checkpoints" / "last.ckpt")
    stopped = tmp_path / "c"  # a newer run that saved nothing: named and passed over
    (stopped / ".hydra").mkdir(parents=True)
    (stopped / ".hydra" / "hydra.yaml").write_text("")
    (stopped / "train.log").write_text("")
    capsys.readouterr()
    assert find_checkpoint(None, str(tmp_path)) == resolve(first / "checkpoints" / "last.ckpt")
    said = capsys.readouterr().out
    assert "skipped 1 later training run(s) without a complete checkpoints/last.ckpt" in said
    assert str(stopped) in said
    for run in (first, last):
        shutil.rmtree(run / "checkpoints")
    with pytest.raises(UserError, match=r"No training run under .* has a complete") as err:
        find_checkpoint(None, str(tmp_path))
    assert all(str(run) in str(err.value) for run in (first, last, stopped))
