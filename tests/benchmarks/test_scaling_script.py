"""benchmarks/scaling.py (issue #33's scaling table) end to end on CPU worlds of 1 and 2
with the tiny Wan pipeline: every stage is measured and scaled per world."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_scaling_script_writes_every_stage_and_a_speedup_per_world(tmp_path):
    out = tmp_path / "scaling.json"
    command = [
        sys.executable,
        str(ROOT / "benchmarks" / "scaling.py"),
        *("--device", "cpu", "--worlds", "1,2", "--models", "tiny", "--steps", "1"),
        *("--layouts", "single,ulysses2", "--root", str(tmp_path), "--out", str(out)),
        *("--plot", str(tmp_path / "speedup.png")),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "plugin")}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())["results"]["tiny"]
    assert set(result["worlds"]) == {"1", "2"}
    assert set(result["worlds"]["2"]["generation"]) == {"ulysses2"}
    for entry in result["worlds"].values():
        for layout in entry["generation"].values():
            assert set(layout["stages_s"]) == {"encode_prompt", "denoise", "decode", "total"}
            assert all(s > 0 for s in layout["stages_s"].values())
        assert "skipped" in entry["diffusers_cp"]  # NCCL only
        assert entry["training"]["steps_per_s"] > 0
    ulysses = result["worlds"]["2"]["generation"]["ulysses2"]
    assert {c["group"] for c in ulysses["collectives"]} >= {"ulysses"}
    scaling = result["scaling"]
    assert scaling["best_layout"] == {"1": "single", "2": "ulysses2"}
    for stage in ("encode_prompt", "denoise", "decode", "total"):
        per_world = scaling["stages"][f"generation.{stage}"]
        assert set(per_world) == {"1", "2"} and per_world["1"]["speedup"] == 1.0
        assert per_world["2"]["speedup"] > 0
    assert set(scaling["stages"]["training.step"]) == {"1", "2"}
    assert (tmp_path / "speedup.png").stat().st_size > 0
    assert "world  2 ulysses2" in done.stdout
