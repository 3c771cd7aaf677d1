"""What every vidpar Hydra entry point shares: the ``parallel`` presets and schema, the
layout built once from them, and one-paragraph errors instead of deep tracebacks."""

from __future__ import annotations

import dataclasses
import functools
import sys
import traceback
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from vidpar.cli.console_log import console_transcript
from vidpar.cli.resolvers import register_resolvers
from vidpar.config import PRESETS, ParallelConfig
from vidpar.resources import CONFIG_DIR

register_resolvers()


class UserError(Exception):
    """A mistake in the user's configuration or files, explained in one paragraph."""


def _schema() -> type:
    """A mutable dataclass with :class:`ParallelConfig`'s size fields, types and defaults
    and a ``_target_``, so Hydra checks every key at compose time and instantiates the
    node as a :class:`ParallelConfig`."""
    hints = typing.get_type_hints(ParallelConfig)
    fields = [
        (f.name, hints[f.name], f.default)
        for f in dataclasses.fields(ParallelConfig)
        if f.name != "world_size"
    ]
    target = ("_target_", str, f"{ParallelConfig.__module__}.{ParallelConfig.__qualname__}")
    return dataclasses.make_dataclass("ParallelSchema", [target, *fields])


ParallelSchema = _schema()


def register() -> None:
    """Offer every layout of :data:`vidpar.config.PRESETS` as ``parallel=<name>``."""
    store = ConfigStore.instance()
    for name, sizes in PRESETS.items():
        store.store(group="parallel", name=name, node=ParallelSchema(**sizes))


def build_layout(node: DictConfig) -> ParallelConfig:
    """The one :class:`ParallelConfig` of a command, instantiated from its ``parallel``
    node, with a clear error if the sizes are invalid."""
    try:
        return instantiate(node)
    except InstantiationException as err:
        cause = err.__cause__ or err
        if not isinstance(cause, ValueError):
            raise
        values = {k: v for k, v in OmegaConf.to_container(node).items() if v is not None}
        values.pop("_target_", None)
        given = " ".join(f"parallel.{k}={v}" for k, v in values.items())
        change = (
            f"set parallel.sp={values['ulysses'] * values['ring']} or parallel.sp=null "
            "(presets set sp; give it with ring alone, e.g. parallel.sp=4 parallel.ring=2)"
            if {"sp", "ulysses", "ring"} <= values.keys()
            else f"pick a preset (parallel={'|'.join(PRESETS)}) or set positive sizes whose "
            "product matches the devices"
        )
        raise UserError(
            f"The parallel layout is invalid: {cause}. You gave {given}. To fix it, {change}."
        ) from None


def friendly_errors(main: Callable[..., None]) -> Callable[..., None]:
    """Print :class:`UserError` as a paragraph and exit with status 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> None:
        try:
            main(*args, **kwargs)
        except UserError as err:
            print(f"\nvidpar: {err}\n", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper


def console_command(
    config_name: str,
    run: Callable[[DictConfig], Any],
    worker_imports: Callable[[DictConfig], Sequence[str]] | None = None,
) -> Callable[[], None]:
    """The console entry point of a vidpar command: Hydra composes ``config_name`` (its
    job name is set in that config) and ``run`` gets the config, while everything the
    console shows, the workers' lines included, goes to ``<output dir>/<job name>.log``
    too; :class:`UserError` ends it as one paragraph, any other error leaves its full
    traceback in the log (the console gets Hydra's account of it). A command that starts
    workers names what they import (``worker_imports(config)``): their fork server starts
    with those as soon as the config is composed, so that its imports overlap the
    command's own set-up, and imports nothing the workers will not use."""

    @hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name=config_name)
    def main(conf: DictConfig) -> None:
        if worker_imports is not None:
            from vidpar.executor.start_method import start_server_early  # torch: not for --help

            start_server_early(worker_imports(conf))
        job = HydraConfig.get()
        transcript = console_transcript()
        with transcript.recording(Path(job.runtime.output_dir) / f"{job.job.name}.log"):
            try:
                friendly_errors(run)(conf)
            except Exception:
                transcript.sync()  # the console's lines first
                transcript.write(traceback.format_exc().encode())
                raise

    return main
