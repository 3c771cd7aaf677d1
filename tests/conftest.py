"""Shared fixtures: the pool of real multi-process worlds.

The tests mirror the package (``tests/<sub-package>/test_*.py``, the whole package's in
``tests/end_to_end/``) and their helpers and child-process scripts live in
``tests/support/``. Every one of these folders goes on ``sys.path`` here, before any test
module is imported, so that tests and helpers import each other by file name wherever they
sit, and the worlds' processes (which take the ``sys.path`` of their start) find every test
module whose functions they are sent.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent
FOLDERS = [str(p) for p in sorted(TESTS.iterdir()) if p.is_dir() and p.name[0] not in "._"]
sys.path[:0] = [folder for folder in FOLDERS if folder not in sys.path]

from readme_blocks import ReadmeRun  # noqa: E402
from world import Worlds  # noqa: E402


def pytest_configure(config):
    """inductor's on-disk caches (FX graphs, C++ kernels) in one folder of the session,
    shared by every process it starts (the worlds' ranks build a kernel once, a later test
    reuses it) and gone after it (a clean run compiles afresh, as CI's does), unless
    ``TORCHINDUCTOR_CACHE_DIR`` names one; each process compiles its kernels itself, not in
    a pool of workers of its own (``TORCHINDUCTOR_COMPILE_THREADS``: the ranks already
    share the cores)."""
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        folder = tempfile.mkdtemp(prefix="vidpar-inductor-")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = folder
        config.add_cleanup(lambda: shutil.rmtree(folder, ignore_errors=True))
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")


@pytest.fixture(scope="session")
def worlds():
    """``worlds(n)`` is a live gloo world of ``n`` processes, shared by every test."""
    pool = Worlds()
    yield pool
    pool.close()


@pytest.fixture(scope="session")
def readme_run(tmp_path_factory) -> ReadmeRun:
    """README.md's code blocks, run in order in one scratch folder as a user would, each at
    most once per session: its quick start is the session's one run of the default job."""
    return ReadmeRun(tmp_path_factory.mktemp("readme"), tmp_path_factory.mktemp("readme-scripts"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_rank_world():
    """A 1-rank torch.distributed world in this process (gloo for CPU tensors, NCCL for
    CUDA ones) for the GPU tests of world-1 communicators; destroyed after the module."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    torch.cuda.set_device(0)
    dist.init_process_group("cpu:gloo,cuda:nccl", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()
