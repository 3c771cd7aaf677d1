"""The benchmark suites behind ``vidpar-bench``, one module per suite.

Each suite module has an options dataclass, ``run(options, common) -> dict`` (the suite's
part of the JSON report: ``results``, ``summary``, ``notes``) and ``table(report) -> str``.
They can be used from Python without Hydra::

    from vidpar.benchmarks import Common, collectives
    report = collectives.run(collectives.CollectivesOptions(max_bytes="1MiB"), Common())
    print(collectives.table(report))
"""

from __future__ import annotations

import importlib
from types import ModuleType

from vidpar.benchmarks.common import Common

#: Suite name -> (module, options class).
SUITES: dict[str, tuple[str, str]] = {
    "collectives": ("vidpar.benchmarks.collectives", "CollectivesOptions"),
    "communicators": ("vidpar.benchmarks.communicators", "CommunicatorsOptions"),
    "attention": ("vidpar.benchmarks.attention", "AttentionOptions"),
    "dit": ("vidpar.benchmarks.dit", "DiTOptions"),
    "rpc": ("vidpar.benchmarks.rpc", "RpcOptions"),
    "train": ("vidpar.benchmarks.train", "TrainOptions"),
    "telemetry": ("vidpar.benchmarks.telemetry", "TelemetryOptions"),
    "models": ("vidpar.benchmarks.models", "ModelsOptions"),
}


def suite_module(name: str) -> ModuleType:
    """The module of suite ``name``."""
    try:
        return importlib.import_module(SUITES[name][0])
    except KeyError:
        raise ValueError(f"unknown suite {name!r}; choose one of {', '.join(SUITES)}") from None


def options_class(name: str) -> type:
    """The options dataclass of suite ``name``."""
    return getattr(suite_module(name), SUITES[name][1])


__all__ = ["SUITES", "Common", "options_class", "suite_module"]
