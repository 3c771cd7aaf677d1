"""``vidpar-train``: fit a video DiT with VidParStrategy, configured by Hydra.

With no arguments it trains the tiny class-to-video DiT with tp2 × sp2 over 4 CPU
processes on the built-in moving-shapes clips, logs to an offline W&B run and saves a
sharded checkpoint under Hydra's output directory.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig

from vidpar.cli.hydra_setup import build_layout, console_command, register
from vidpar.config import ParallelConfig

register()


def build_trainer(conf: DictConfig, parallel: ParallelConfig):
    """The Trainer with strategy (holding the layout ``parallel``), logger and callbacks of
    ``conf``."""
    from vidpar.lightning import CollectiveTelemetry, StepProgressBar

    # A partial, so the layout arrives as the object itself (OmegaConf would copy a
    # dataclass passed to instantiate into a config node).
    strategy = instantiate(conf.strategy, _partial_=True)(parallel=parallel)
    logger = instantiate(conf.logger) if conf.get("logger") and "_target_" in conf.logger else False
    callbacks = [instantiate(conf.checkpoint), StepProgressBar()]
    if conf.telemetry.enabled:
        callbacks.append(CollectiveTelemetry(log_every_n_steps=conf.telemetry.log_every_n_steps))
    devices = conf.trainer.devices or parallel.world_size // conf.trainer.num_nodes
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
    # Imported here, not with the module: `vidpar-train --help` and `--cfg` need no torch.
    from vidpar.cli.validation import check_before_launch, check_train_config

    parallel = build_layout(conf.parallel)  # the one layout of this run
    check_train_config(conf, parallel)
    check_before_launch(conf, parallel)
    # Lightning (seconds of imports) only once the settings are known to be good.
    from vidpar.cli.validation_model import check_data_fits_model
    from vidpar.cli.wandb_runs import job_wandb_run
    from vidpar.distributed.checkpoint import CheckpointWriteError
    from vidpar.executor import RemoteError
    from vidpar.lightning import TrainingInterrupted

    log_lightning_once()
    os.environ.setdefault("WANDB_MODE", "offline")
    datamodule = instantiate(conf.data)
    check_data_fits_model(datamodule.video_shape, conf.model)
    names = getattr(datamodule.train_set, "shape_names", None)  # latents have no classes
    module = instantiate(
        conf.model,
        class_names=None if names is None else list(names),
        video_shape=list(datamodule.video_shape),
        _convert_="all",
    )
    trainer = build_trainer(conf, parallel)
    print(f"vidpar: {parallel.describe()}; output in {conf.output_dir}")
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
    from vidpar.distributed.checkpoint import is_complete

    path = getattr(trainer.checkpoint_callback, "last_model_path", "")
    return Path(path) if path and is_complete(Path(path)) else None


def worker_imports(conf: DictConfig) -> tuple[str, ...]:
    """What a training run's workers import: torch, Lightning and vidpar's modules, and
    diffusers' model code where the model is a diffusers folder (``model.path``)."""
    from vidpar.executor.start_method import PRELOAD

    diffusers = ("diffusers.models.transformers",) if "path" in conf.model else ()
    return (*PRELOAD, *diffusers)


main = console_command("train", run, worker_imports)

if __name__ == "__main__":
    main()
