"""benchmarks/families_gpu.py (issue #29's world-1 rows) as a CPU dry run with the tiny
models: every family it is asked for gets its medians, ratio and verdict against the 2 %
target, with the versions, device, date and input shapes BENCHMARKS.md cites."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from world import get_free_port

ROOT = Path(__file__).resolve().parents[2]


def test_the_families_script_dry_run_reports_what_benchmarks_md_needs(tmp_path):
    out = tmp_path / "families.json"
    families = ("ltx", "hunyuan_video")
    command = [
        sys.executable,
        str(ROOT / "benchmarks" / "families_gpu.py"),
        *("--tiny", "--runs", "2", "--families", ",".join(families), "--out", str(out)),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "plugin"), "MASTER_PORT": str(get_free_port())}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert {"torch", "diffusers", "device", "date", "runs"} <= result.keys()
    assert result["runs"] == 2 and result["device"] == "cpu (tiny)"
    for family in families:
        entry = result[family]
        assert "error" not in entry, entry
        assert [len(entry["seconds"][side]) for side in ("diffusers", "vidpar")] == [2, 2]
        ratio = entry["median_s"]["vidpar"] / entry["median_s"]["diffusers"]
        assert entry["vidpar_over_diffusers_time"] == ratio
        assert entry["within_target"] == (ratio <= 1.02)
        assert entry["dtype"] == "torch.float32" and entry["input_shapes"]["hidden_states"]
        assert family in done.stdout
    assert [result[f]["class"] for f in families] == [
        "LTXVideoTransformer3DModel",
        "HunyuanVideoTransformer3DModel",
    ]
