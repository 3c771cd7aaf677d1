"""README.md works as written: every code block runs, in order, in one folder, as a new user
runs them (:mod:`readme_blocks`), its install and test commands are what CI runs, and the
commands it names inline compose with Hydra. A README that drifts from the code fails here.

The quick start is the default job (minutes); ``tests/end_to_end/test_default_job_quality.py`` scores
the checkpoint it writes, so the session runs it once. The other blocks are small.
"""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir

from readme_blocks import (
    LANGUAGES,
    QUICK_START,
    ci_commands,
    inline_commands,
    readme_blocks,
    readme_ci_commands,
)
from vidpar.cli.hydra_setup import build_layout, register
from vidpar.resources import CONFIG_DIR

register()

RUNNABLE = [block for block in readme_blocks() if not block.ci_only]
#: The console scripts whose inline commands are checked, and their Hydra configs.
CONFIGS = {"vidpar-train": "train", "vidpar-generate": "generate"}


def test_install_and_test_commands_are_what_ci_runs() -> None:
    """The README's install and test commands are run by CI (.ci/run), not here."""
    assert readme_ci_commands() == ci_commands()
    assert ["python", "-m", "pytest", "-q"] in ci_commands()


def test_every_block_is_bash_or_python() -> None:
    assert {block.language for block in readme_blocks()} <= set(LANGUAGES)
    assert any(block.code.strip() == QUICK_START for block in RUNNABLE)


@pytest.mark.timeout(3000)  # the first block run is the quick start: the default job
@pytest.mark.parametrize("block", RUNNABLE, ids=[block.name for block in RUNNABLE])
def test_the_block_runs_as_written(readme_run, block) -> None:
    outcome = readme_run.through(block)
    failed = readme_run.failed_before(block)
    assert outcome.returncode == 0, outcome.report() + (
        f"\n(blocks before it that failed: {failed})" if failed else ""
    )


@pytest.mark.parametrize("command", inline_commands(tuple(CONFIGS)))
def test_the_commands_named_in_the_text_compose(command: str) -> None:
    """Commands the README names in its text (larger layouts, GPU recipes) are not run, but
    their config groups, recipes and keys must exist and their layout must be valid."""
    program, *overrides = command.split()
    if "-m" in overrides or "--cfg" in overrides:
        pytest.fail(f"{command!r}: sweeps and --cfg belong in a code block, where they run")
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        config = compose(CONFIGS[program], overrides=overrides)
    build_layout(config.parallel)
