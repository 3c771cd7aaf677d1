"""SIGKILL during a save, at every file operation of every rank (before each create,
rename, symlink, removal and fsync, and mid-write): resume and vidpar-generate always
find a complete checkpoint, the old or the new, never a mix; the next save succeeds and
sweeps what the killed one left. The harness is kill_during_save.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HARNESS = Path(__file__).parents[1] / "support" / "kill_during_save.py"


def kill_everywhere(out: Path, *args: str) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(HARNESS), str(out), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout)["points"]


def check(points: list[dict], world: int, keep_last: int) -> None:
    for point in points:
        where = f"killed at rank {point['rank']} {point['op']}: {point}"
        assert point["ends"] == ["killed"] * world, where  # the whole job died there
        assert point["problem"] is None and point["seed"] in (1, 2), where
        after = point["after"]
        assert after["ends"] == ["ok"] * world and after["problem"] is None, where
        assert after["seed"] == 3 and after["partials_left"] == [], where
        assert after["versions"] == keep_last, where
        assert after["swept_line"] == bool(point["partials"]), where
    # Rank 0's points in the order of its operations: the old checkpoint until the pointer
    # moves, the new one from then on.
    seeds = [p["seed"] for p in points if p["rank"] == 0]
    assert seeds == sorted(seeds) and set(seeds) == {1, 2}, seeds


def test_a_save_killed_anywhere_leaves_the_old_or_the_new_checkpoint(tmp_path):
    points = kill_everywhere(tmp_path, "--world", "2", "--tp", "2", "--keep-last", "1")
    assert len(points) >= 20
    assert {p["rank"] for p in points} == {0, 1}
    assert any(p["op"].endswith("(torn)") for p in points)
    assert any(p["op"].startswith("os.rename") and "last.ckpt" in p["op"] for p in points)
    check(points, world=2, keep_last=1)


@pytest.mark.slow
def test_killed_saves_over_an_older_vidpar_checkpoint_in_a_world_of_four(tmp_path):
    """tp2 × dp2, two versions kept, and the first save adopting an older vidpar's plain
    checkpoint directory (no manifest) as a version."""
    points = kill_everywhere(tmp_path, "--world", "4", "--tp", "2", "--keep-last", "2", "--legacy")
    assert len(points) >= 30
    check(points, world=4, keep_last=2)
