"""What every vidpar Hydra entry point shares: the config folder, the ``parallel`` schema,
the world-size resolver, and one-paragraph errors instead of deep tracebacks."""

from __future__ import annotations

import dataclasses
import functools
import sys
import typing
from collections.abc import Callable
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from vidpar.config import ParallelConfig

#: The Hydra configs: ``vidpar/conf`` links to the checkout's ``conf/``; wheels carry a copy.
CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "conf")


class UserError(Exception):
    """A mistake in the user's configuration or files, explained in one paragraph."""


def _world_size(tp, sp, ulysses, ring, cfg, dp) -> int:
    return parallel_config(
        OmegaConf.create(dict(tp=tp, sp=sp, ulysses=ulysses, ring=ring, cfg=cfg, dp=dp))
    ).world_size


def _schema() -> type:
    """A mutable dataclass with :class:`ParallelConfig`'s fields, types and defaults."""
    hints = typing.get_type_hints(ParallelConfig)
    fields = [(f.name, hints[f.name], f.default) for f in dataclasses.fields(ParallelConfig)]
    return dataclasses.make_dataclass("ParallelSchema", fields)


def register() -> None:
    """Register the ``parallel`` schema (typos and wrong types fail at compose time) and
    the ``vidpar_world_size`` resolver."""
    ConfigStore.instance().store(group="parallel", name="schema", node=_schema())
    if not OmegaConf.has_resolver("vidpar_world_size"):
        OmegaConf.register_new_resolver("vidpar_world_size", _world_size)


def parallel_config(node: DictConfig) -> ParallelConfig:
    """The :class:`ParallelConfig` of a ``parallel`` node, with a clear error if invalid."""
    values = {k: v for k, v in OmegaConf.to_container(node).items() if v is not None}
    try:
        return ParallelConfig(**values)
    except ValueError as err:
        given = " ".join(f"parallel.{k}={v}" for k, v in values.items())
        change = (
            f"set parallel.sp={values['ulysses'] * values['ring']} or parallel.sp=null "
            "(presets set sp; give it with ring alone, e.g. parallel.sp=4 parallel.ring=2)"
            if {"sp", "ulysses", "ring"} <= values.keys()
            else "pick a preset (parallel=single|tp2|sp2|ring2|tp2_sp2|usp_2x2|cfg2|sp2_dp2|"
            "tp2_dp2) or set positive sizes whose product matches the devices"
        )
        raise UserError(
            f"The parallel layout is invalid: {err}. You gave {given}. To fix it, {change}."
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
