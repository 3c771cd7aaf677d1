"""Shared fixtures: the pool of real multi-process worlds."""

from __future__ import annotations

import pytest
import torch

from world import Worlds


@pytest.fixture(scope="session")
def worlds():
    """``worlds(n)`` is a live gloo world of ``n`` processes, shared by every test."""
    pool = Worlds()
    yield pool
    pool.close()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
