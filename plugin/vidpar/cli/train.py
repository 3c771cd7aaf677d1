"""``vidpar-train``: fit a video DiT with VidParStrategy, configured by Hydra.

With no arguments it trains the tiny class-to-video DiT with tp2 × sp2 over 4 CPU
processes on the built-in moving-shapes clips, logs to an offline W&B run and saves a
sharded checkpoint under Hydra's output directory.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import asdict
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from vidpar.cli.hydra_setup import UserError, build_layout, console_command, register
from vidpar.cli.validation import check_train_config
from vidpar.cli.validation_model import check_data_fits_model, check_model_before_launch
from vidpar.cli.wandb_runs import job_wandb_run
from vidpar.config import ParallelConfig
from vidpar.distributed.checkpoint import TRAINER_STATE, CheckpointWriteError, is_complete
from vidpar.distributed.checkpoint_integrity import CorruptCheckpointError, verify
from vidpar.distributed.checkpoint_signing import UntrustedCheckpointError
from vidpar.distributed.checkpoint_state import load_trainer_state
from vidpar.distributed.checkpoint_store import resolve
from vidpar.nn.dit import DiTConfig

register()


def check_resume(conf: DictConfig) -> None:
    """``ckpt_path``: a complete checkpoint, intact, signed by this user (or trusted), of the
    model the config describes."""
    if conf.ckpt_path is None:
        return
    if not is_complete(Path(conf.ckpt_path)):
        raise UserError(
            f"ckpt_path={conf.ckpt_path} is not a complete vidpar checkpoint (a directory with "
            "trainer_state.pt and DCP metadata). Point it at a checkpoints/*.ckpt directory "
            "of an earlier run, or drop ckpt_path to start fresh."
        )
    ckpt = resolve(conf.ckpt_path)
    try:  # the signature, every file's size and checksums, before any worker starts
        verify(ckpt, trust=bool(conf.get("trust_checkpoint", False)))
    except (CorruptCheckpointError, UntrustedCheckpointError) as err:
        raise UserError(str(err)) from None
    check_checkpoint_model(ckpt, conf.model)


def check_checkpoint_cadence(conf: DictConfig) -> None:
    """``checkpoint.every_n_minutes``: a positive number of minutes, or null."""
    minutes = conf.checkpoint.get("every_n_minutes")
    if minutes is not None and (
        not isinstance(minutes, int | float) or isinstance(minutes, bool) or minutes <= 0
    ):
        raise UserError(
            f"checkpoint.every_n_minutes={minutes} is not a number of minutes. Set it to a "
            "positive number (checkpoint.every_n_minutes=30 saves last.ckpt every half "
            "hour of training), or null for no time-based saves."
        )


def check_before_launch(conf: DictConfig, layout: ParallelConfig) -> None:
    """Every mistake we can see from the config and its files fails here, before any
    process starts: the model, its optimizer and devices, the data against the model,
    the checkpoint cadence and the checkpoint to resume."""
    check_model_before_launch(conf, layout)
    check_checkpoint_cadence(conf)
    check_resume(conf)


#: DiT settings that change how it runs, not its weights: free to differ on resume.
RESUMABLE_DIT_CHANGES = frozenset({"activation_checkpointing", "compile"})


def check_checkpoint_model(ckpt: Path, model: DictConfig) -> None:
    """A checkpoint resumes only into the model it was written by: name the settings that
    differ (DiT sizes, and whether there is an EMA copy) as command-line overrides."""
    try:
        hparams = load_trainer_state(ckpt / TRAINER_STATE).get("hyper_parameters", {})
    except ValueError as err:
        raise UserError(f"ckpt_path={ckpt}: {err}") from None
    if "dit" not in hparams or "dit" not in model:
        return
    saved = asdict(DiTConfig.from_saved(hparams["dit"]))
    wanted = asdict(DiTConfig(**OmegaConf.to_container(model.dit, resolve=True)))
    overrides = [
        f"model.dit.{key}={_as_override(saved[key])}"
        for key in saved
        if saved[key] != wanted[key] and key not in RESUMABLE_DIT_CHANGES
    ]
    saved_ema = hparams.get("ema_decay", 0.0)
    if (saved_ema > 0) != (model.get("ema_decay", 0.0) > 0):
        overrides.append(f"model.ema_decay={saved_ema}")
    if overrides:
        raise UserError(
            f"ckpt_path={ckpt} was written by a different model than the config describes. "
            f"Resume with its settings ({' '.join(overrides)}), or drop ckpt_path to start "
            "fresh."
        )


def _as_override(value: object) -> str:
    return "[" + ",".join(map(str, value)) + "]" if isinstance(value, tuple | list) else str(value)


def build_trainer(conf: DictConfig, layout: ParallelConfig):
    """The Trainer with strategy (holding ``layout``), logger and callbacks of ``conf``."""
    from vidpar.lightning import CollectiveTelemetry, StepProgressBar

    # A partial, so the layout arrives as the object itself (OmegaConf would copy a
    # dataclass passed to instantiate into a config node).
    strategy = instantiate(conf.strategy, _partial_=True)(parallel=layout)
    logger = instantiate(conf.logger) if conf.get("logger") and "_target_" in conf.logger else False
    callbacks = [instantiate(conf.checkpoint), StepProgressBar()]
    if conf.telemetry.enabled:
        callbacks.append(CollectiveTelemetry(log_every_n_steps=conf.telemetry.log_every_n_steps))
    devices = conf.trainer.devices or layout.world_size // conf.trainer.num_nodes
    return instantiate(
        conf.trainer, strategy=strategy, logger=logger, callbacks=callbacks, devices=devices
    )


def log_lightning_once() -> None:
    """Lightning adds a console handler of its own when imported; where Hydra's root
    handlers already print (and file) every record, drop it so no line appears twice."""
    import lightning  # noqa: F401  (the import adds the handler)

    if logging.getLogger().handlers:
        logging.getLogger("lightning").handlers.clear()


def run(conf: DictConfig) -> Path | None:
    """Train as ``conf`` says; returns the path of the last checkpoint it wrote, if any.
    ``SIGTERM`` or Ctrl-C save a checkpoint at the current step and exit with status
    128 + the signal's number (``strategy.checkpoint_on_interrupt=false``: no save)."""
    from vidpar.executor import RemoteError
    from vidpar.lightning import TrainingInterrupted

    log_lightning_once()
    os.environ.setdefault("WANDB_MODE", "offline")
    layout = build_layout(conf.parallel)  # the one layout of this run
    check_train_config(conf, layout)
    check_before_launch(conf, layout)
    datamodule = instantiate(conf.data)
    check_data_fits_model(datamodule.video_shape, conf.model)
    names = getattr(datamodule.train_set, "shape_names", None)  # latents have no classes
    module = instantiate(
        conf.model,
        class_names=None if names is None else list(names),
        video_shape=list(datamodule.video_shape),
        _convert_="all",
    )
    trainer = build_trainer(conf, layout)
    print(f"vidpar: {layout.describe()}; output in {conf.output_dir}")
    with job_wandb_run(conf):
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=conf.ckpt_path)
        except TrainingInterrupted as stop:  # SIGTERM / Ctrl-C: saved at this step, 128+N
            print(f"\nvidpar: {stop}", file=sys.stderr, flush=True)
            raise SystemExit(128 + stop.signum) from None
        except (RemoteError, CheckpointWriteError) as err:  # a full disk: say so in one line
            failed = getattr(err, "errors", {0: err}).values()
            failed = [getattr(e, "exception", e) for e in failed]
            failed = [e for e in failed if isinstance(e, CheckpointWriteError)]
            if not failed:
                raise
            print(f"\nvidpar: {failed[0]}", file=sys.stderr, flush=True)
            raise SystemExit(1) from None
    loss = trainer.callback_metrics.get("train/loss")
    print(f"vidpar: final train/loss {float(loss):.4f}" if loss is not None else "")
    last = written_checkpoint(trainer)
    if last is None:
        print(
            f"vidpar: no checkpoint was written (trainer.max_steps={conf.trainer.max_steps}, "
            f"checkpoint.every_n_train_steps={conf.checkpoint.get('every_n_train_steps')})"
        )
    else:
        print(f"vidpar: checkpoint {last}")
    return last


def written_checkpoint(trainer) -> Path | None:
    """The last checkpoint this run's checkpoint callback wrote (not one an earlier run left
    in the same directory), if it is there and complete."""
    path = getattr(trainer.checkpoint_callback, "last_model_path", "")
    return Path(path) if path and is_complete(Path(path)) else None


main = console_command("train", run, starts_workers=True)

if __name__ == "__main__":
    main()
