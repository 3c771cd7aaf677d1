"""Output directories that concurrent runs never share.

Hydra names a run's directory after the second it started (``outputs/<date>/<time>``), so
two runs started in the same second in one place would share it, and their logs and
checkpoints. :class:`ExclusiveOutputDir`, a Hydra callback of every vidpar command,
creates a time-stamped run (or sweep) directory exclusively before the job starts, and
takes ``<time>-1``, ``<time>-2``, ... when it is taken. A directory without a time stamp
(``hydra.run.dir=run``, ``hydra.run.dir=.``) is used as given.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write


def claim_unique_dir(path: str | Path) -> Path:
    """Create the directory ``path``, or ``path-1``, ``path-2``, ... if it exists, and
    return the one created. ``mkdir`` without ``exist_ok`` is atomic, so of several
    processes claiming one path, exactly one gets each name."""
    base = Path(path)
    base.parent.mkdir(parents=True, exist_ok=True)
    for n in itertools.count():
        candidate = base if n == 0 else base.with_name(f"{base.name}-{n}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return candidate
    raise AssertionError("unreachable")


def _claim(config: DictConfig, mode: str) -> str | None:
    """Claim ``hydra.<mode>.dir`` if it is time-stamped; set it to the directory claimed."""
    raw = OmegaConf.to_container(config.hydra[mode], resolve=False)["dir"]
    if "${now:" not in str(raw):
        return None
    claimed = str(claim_unique_dir(str(config.hydra[mode].dir)))
    with read_write(config.hydra), open_dict(config.hydra):
        config.hydra[mode].dir = claimed
    return claimed


def _override_value(text: str) -> str:
    """``text`` quoted for Hydra's override grammar."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


class ExclusiveOutputDir(Callback):
    """Hydra callback: the run directory (or a sweep's directory) of this command is its
    own. In a sweep, every job is composed again from the command line, so the directory
    claimed is added to the sweep's Hydra overrides for the jobs to inherit."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _claim(config, "run")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        claimed = _claim(config, "sweep")
        if claimed is not None:
            with read_write(config.hydra), open_dict(config.hydra):
                config.hydra.overrides.hydra.append(f"hydra.sweep.dir={_override_value(claimed)}")
