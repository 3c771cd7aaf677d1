"""OmegaConf resolvers of vidpar's configs (registered when :mod:`vidpar.cli.hydra_setup`
is imported, before Hydra composes anything)."""

from __future__ import annotations

from omegaconf import OmegaConf


def at_max_steps(max_steps: int) -> int | None:
    """The default ``checkpoint.every_n_train_steps``: one checkpoint at ``max_steps``;
    with ``max_steps=-1`` (train for ``max_epochs``) null, i.e. one after every epoch."""
    return None if max_steps == -1 else max_steps


def run_name() -> str | None:
    """A job's name from its overrides, e.g. ``parallel=sp2`` (Hydra's
    ``job.override_dirname``; in a sweep only the swept ones, see
    :class:`~vidpar.cli.wandb_runs.SweepJobNames`); null without overrides, or outside a
    Hydra job (a config composed by ``hydra.compose``)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    return HydraConfig.get().job.override_dirname or None


def register_resolvers() -> None:
    """``${vidpar.at_max_steps:N}``, ``${vidpar.run_name:}``, and
    ``${vidpar.usage:COMMAND}`` (the start of a command's ``--help``)."""
    from vidpar.cli.usage import usage

    OmegaConf.register_new_resolver("vidpar.at_max_steps", at_max_steps, replace=True)
    OmegaConf.register_new_resolver("vidpar.run_name", run_name, replace=True)
    OmegaConf.register_new_resolver("vidpar.usage", usage, replace=True)
