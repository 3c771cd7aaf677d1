"""OmegaConf resolvers of vidpar's configs (registered when :mod:`vidpar.cli.hydra_setup`
is imported, before Hydra composes anything)."""

from __future__ import annotations

from omegaconf import OmegaConf


def at_max_steps(max_steps: int) -> int | None:
    """The default ``checkpoint.every_n_train_steps``: one checkpoint at ``max_steps``;
    with ``max_steps=-1`` (train for ``max_epochs``) null, i.e. one after every epoch."""
    return None if max_steps == -1 else max_steps


def none_if_empty(text: str) -> str | None:
    """``text``, or null for an empty one (e.g. a run without overrides has no name)."""
    return text or None


def register_resolvers() -> None:
    """``${vidpar.at_max_steps:N}``, ``${vidpar.none_if_empty:TEXT}``, and
    ``${vidpar.usage:COMMAND}`` (the start of a command's ``--help``)."""
    from vidpar.cli.usage import usage

    OmegaConf.register_new_resolver("vidpar.at_max_steps", at_max_steps, replace=True)
    OmegaConf.register_new_resolver("vidpar.none_if_empty", none_if_empty, replace=True)
    OmegaConf.register_new_resolver("vidpar.usage", usage, replace=True)
