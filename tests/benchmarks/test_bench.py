"""``vidpar-bench``: helpers, the config against its schema, and two suites end to end on
tiny sizes (the console script in a subprocess, and the Python entry in-process)."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from vidpar.benchmarks import SUITES, dit_compare, options_class
from vidpar.benchmarks.common import format_table, geometric_sizes, median, parse_bytes, rank_max
from vidpar.cli import bench
from vidpar.cli.hydra_setup import UserError
from vidpar.resources import CONFIG_DIR


def test_sizes_and_statistics():
    assert parse_bytes("1KiB") == 1024
    assert parse_bytes("16 MiB") == 16 * 2**20
    assert parse_bytes("1G") == 2**30
    assert parse_bytes(4096) == 4096
    with pytest.raises(ValueError, match="not a size"):
        parse_bytes("lots")
    assert geometric_sizes(1024, 16 * 1024, 4) == [1024, 4096, 16384]
    assert rank_max([[1.0, 5.0], [2.0, 3.0]]) == [2.0, 5.0]
    text = format_table([{"a": "x", "b": "1.5 ms"}], [("a", "name"), ("b", "time")])
    assert text.splitlines()[2].split() == ["x", "1.5", "ms"]


def test_config_file_matches_the_schema():
    """conf/bench.yaml lists every suite option with the dataclass default (docs that
    cannot drift), and the schema rejects typos."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="bench")
        for name in SUITES:
            defaults = OmegaConf.structured(options_class(name)())
            assert OmegaConf.to_container(cfg[name]) == OmegaConf.to_container(defaults), name
        with pytest.raises(Exception, match="nope"):
            compose(config_name="bench", overrides=["collectives.nope=1"])


def test_collectives_console_script(tmp_path):
    out = tmp_path / "collectives.json"
    cmd = [
        "vidpar-bench",
        "suite=collectives",
        "device=cpu",
        "collectives.max_bytes=4KiB",
        "collectives.factor=4",
        "collectives.ops=[all_reduce,all_to_all]",
        "repeats=3",
        "warmup=1",
        "runs=2",
        f"output={out}",
        f"hydra.run.dir={tmp_path / 'hydra'}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "vidpar/raw" in proc.stdout
    report = json.loads(out.read_text())
    assert report["suite"] == "collectives"
    assert report["command"].startswith("vidpar-bench suite=collectives")
    assert {"host", "started", "finished", "common", "options", "summary"} <= report.keys()
    rows = report["results"]
    assert [(r["op"], r["bytes"]) for r in rows] == [
        ("all_reduce", 1024),
        ("all_to_all", 1024),
        ("all_reduce", 4096),
        ("all_to_all", 4096),
    ]
    for row in rows:
        for side in ("vidpar", "raw"):
            assert row[side]["median_s"] > 0
            assert len(row[side]["run_medians_s"]) == 2
            assert row[side]["busbw_GBps"] > 0
        assert row["time_ratio_vidpar_over_raw"] > 0
    # all_reduce on 2 ranks: busbw = algbw × 2(n-1)/n = algbw
    assert rows[0]["vidpar"]["busbw_GBps"] == pytest.approx(rows[0]["vidpar"]["algbw_GBps"])
    assert rows[1]["vidpar"]["busbw_GBps"] == pytest.approx(rows[1]["vidpar"]["algbw_GBps"] / 2)


def test_attention_python_entry(tmp_path, capsys):
    out = tmp_path / "attention.json"
    overrides = [
        "suite=attention",
        "device=cpu",
        "attention.tokens=63",  # not divisible by sp: the padded path
        "attention.heads=4",
        "attention.head_dim=8",
        "repeats=2",
        "warmup=1",
        "runs=1",
        f"output={out}",
    ]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="bench", overrides=overrides)
    report = bench.run(cfg, command="test")
    assert "speedup" in capsys.readouterr().out
    assert json.loads(out.read_text())["results"] == report["results"]
    assert [r["mode"] for r in report["results"]] == ["ulysses", "ring"]
    assert report["size"]["tokens"] == 63
    for row in report["results"]:
        assert row["max_abs_diff"] < 1e-5 < row["max_abs_ref"]
        for pass_name in ("forward", "backward"):
            assert row[pass_name]["speedup"] > 0
            assert row[pass_name]["single"]["median_s"] > 0
            assert row[pass_name]["parallel"]["median_s"] > 0


def test_bad_settings_are_user_errors():
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="bench", overrides=["suite=nope", "output=unused.json"])
        with pytest.raises(UserError, match="suite=nope is not a benchmark suite"):
            bench.run(cfg)
        cfg = compose(config_name="bench", overrides=["suite=dit", "dit.modes=[tp3]"])
        with pytest.raises(UserError, match="unknown dit mode 'tp3'"):
            bench.run(cfg)


def test_communicators_suite_needs_cuda_and_summarises_per_path():
    from vidpar.benchmarks import Common, communicators

    with pytest.raises(ValueError, match="device=cuda"):
        communicators.run(communicators.CommunicatorsOptions(), Common(device="cpu"))
    rank = {  # one rank's sweep of one run: per-iteration seconds of each path
        "library": "NcclLibrary(NCCL 2.28.9 from /x/libnccl.so.2)",
        "rows": [
            {"op": "all_reduce", "bytes": 1024, "torch": [4e-5, 6e-5], "pynccl": [2e-5, 2e-5]},
        ],
    }
    slow = {**rank, "rows": [{**rank["rows"][0], "torch": [8e-5, 8e-5]}]}
    rows = communicators.summarise([[rank, slow], [rank, rank]], world=2)
    (row,) = rows
    assert row["torch"]["run_medians_s"] == pytest.approx([8e-5, 5e-5])  # slowest rank
    assert row["pynccl_over_torch"] == pytest.approx(median([2 / 8, 2 / 5]))
    text = communicators.table({"results": rows})
    assert "pynccl/torch" in text and "graph" not in text
    assert text.splitlines()[2].split()[:3] == ["all_reduce", "1", "KiB"]


def test_dit_compare_with_wan_python_entry(tmp_path) -> None:
    """The one-device comparison on its tiny CPU pair: every variant timed, compiled ones
    equal to their eager ones, the same parameter count for vidpar and Wan; under
    checkpointing also vidpar's keep_attention, in forward + backward only."""
    overrides = ["suite=dit", "device=cpu", "dit.compare=wan", "dit.checkpointing=true"]
    overrides += ["repeats=1", "warmup=0"]
    overrides += ["runs=1", f"output={tmp_path / 'dit.json'}"]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="bench", overrides=overrides)
    report = bench.run(cfg, command="test")
    assert report["size"]["compile_backend"] == "aot_eager"
    assert report["params"]["vidpar"] == report["params"]["wan"]
    assert max(report["max_abs_diff"].values()) < 1e-4
    assert [r["pass"] for r in report["results"]] == ["forward", "backward"]
    for row in report["results"]:
        for name in ("vidpar", "vidpar_compiled", "wan", "wan_compiled"):
            assert row[name]["median_s"] > 0 and row[name]["tflops"] > 0
        assert row["vidpar_compiled"]["compile_s"] >= 0
        assert row["vidpar_speedup"]["ratio"] > 0 and row["vidpar_compiled_speedup"]["ratio"] > 0
    forward, backward = report["results"]
    assert "vidpar_compiled_keep_attention" not in forward
    assert backward["vidpar_compiled_keep_attention_speedup"]["ratio"] > 0
    assert "vidpar_compiled_keep_attention" in dit_compare.table(report)
