"""OmegaConf resolvers of vidpar's configs (registered when :mod:`vidpar.cli.hydra_setup`
is imported, before Hydra composes anything)."""

from __future__ import annotations

from omegaconf import OmegaConf


def at_max_steps(max_steps: int) -> int | None:
    """The default ``checkpoint.every_n_train_steps``: one checkpoint at ``max_steps``;
    with ``max_steps=-1`` (train for ``max_epochs``) null, i.e. one after every epoch."""
    return None if max_steps == -1 else max_steps


def register_resolvers() -> None:
    """``${vidpar.at_max_steps:N}``."""
    OmegaConf.register_new_resolver("vidpar.at_max_steps", at_max_steps, replace=True)
