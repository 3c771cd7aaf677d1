"""Registers vidpar's strategies with Lightning as soon as Lightning is imported.

``import vidpar`` must stay plain torch (no Lightning import), yet
``Trainer(strategy="vidpar")`` should work after it. So a finder on ``sys.meta_path``
waits for ``lightning.pytorch`` to finish importing and then registers the strategies;
if Lightning is already imported, they are registered at once.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from types import ModuleType

_TARGET = "lightning.pytorch"


def _register() -> None:
    import vidpar.lightning.strategy  # noqa: F401  (registers on import)


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself; wraps the real loader of ``lightning.pytorch``."""

    def find_spec(self, fullname: str, path, target=None):
        if fullname != _TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        original = loader.exec_module

        def exec_module(module: ModuleType) -> None:
            original(module)
            _register()

        loader.exec_module = exec_module
        return spec


def install() -> None:
    """Register now if Lightning is loaded, else when it is."""
    if _TARGET in sys.modules:
        _register()
    elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())
