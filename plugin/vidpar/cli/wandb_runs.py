"""One W&B run per job of a vidpar command, also for the jobs of a sweep that Hydra runs
one after another in one process (Lightning's WandbLogger would otherwise log every job
into the first job's run), each named after the overrides that make it that job."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write


class SweepJobNames(Callback):
    """Hydra callback: in a sweep, ``hydra.job.override_dirname`` (the W&B run's name)
    keeps only the swept overrides, e.g. ``parallel=sp2`` for ``-m parallel=single,sp2
    trainer.max_steps=20``; the overrides that every job shares are left out."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        given = OmegaConf.to_container(config.hydra.overrides.task, resolve=False)
        overrides = OverridesParser.create().parse_overrides(given)
        if not any(o.is_sweep_override() for o in overrides):
            return
        naming = config.hydra.job.config.override_dirname
        shared = [o.key_or_group for o in overrides if not o.is_sweep_override()]
        exclude = [*naming.exclude_keys, *(k for k in shared if k not in naming.exclude_keys)]
        with read_write(config.hydra), open_dict(config.hydra):  # the jobs compose again
            config.hydra.overrides.hydra.append(
                f"hydra.job.config.override_dirname.exclude_keys=[{','.join(exclude)}]"
            )


def uses_wandb(conf: DictConfig) -> bool:
    return bool(conf.get("logger")) and conf.logger.get("_target_", "").endswith("WandbLogger")


@contextlib.contextmanager
def job_wandb_run(conf: DictConfig) -> Iterator[None]:
    """The W&B run that this job's logger starts is this job's alone: its files under the
    logger's ``save_dir`` (the job's output dir), and it is finished when the job ends,
    with W&B's session, so the next job's settings (its ``WANDB_DIR``) are read afresh."""
    if not uses_wandb(conf):
        yield
        return
    # Workers attach to the run made here; they find its directory only through this.
    os.environ["WANDB_DIR"] = str(conf.logger.save_dir)
    try:
        yield
    finally:
        if (wandb := sys.modules.get("wandb")) is not None:
            if wandb.run is not None:
                wandb.finish()
            wandb.teardown()
