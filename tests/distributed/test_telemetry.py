"""Telemetry: one record per collective with nccl-tests' bandwidth definitions."""

from __future__ import annotations

import logging

import pytest
import torch

from vidpar.config import ParallelConfig
from vidpar.distributed import state as ps
from vidpar.distributed import telemetry
from vidpar.distributed.device_communicators import create_communicator
from vidpar.distributed.device_communicators.cpu import CpuCommunicator
from vidpar.distributed.telemetry import CollectiveRecord, format_summary, summarize


def record_some_collectives() -> list[tuple]:
    tp, sp = ps.get_tp_group(), ps.get_sp_group()
    x = torch.ones(1024, dtype=torch.float32)
    tp.all_reduce(x)  # not recorded: no recorder yet
    recorder = telemetry.start_recording()
    try:
        tp.all_reduce(x)
        sp.all_gather(x)
        ps.get_cfg_group().all_reduce(x)  # a group of one: nothing to record
        records = recorder.drain()
        assert recorder.records == []
    finally:
        telemetry.stop_recording()
    tp.all_reduce(x)
    assert telemetry.active_recorder() is None
    return [(r.op, r.group, r.dtype, r.nbytes, r.group_size, r.seconds > 0) for r in records]


def test_each_collective_yields_one_record(worlds) -> None:
    for records in worlds(4).run(record_some_collectives, layout=ParallelConfig(tp=2, sp=2)):
        assert records == [
            ("all_reduce", "tp", "float32", 4096, 2, True),
            ("all_gather", "sp", "float32", 8192, 2, True),
        ]


def test_bandwidths_follow_nccl_tests() -> None:
    r = CollectiveRecord("all_reduce", "tp", "bfloat16", 8 * 10**9, 8, 1.0)
    assert r.algbw == 8e9 and r.busbw == pytest.approx(8e9 * 2 * 7 / 8)
    g = CollectiveRecord("all_gather", "sp", "bfloat16", 4 * 10**9, 4, 2.0)
    assert g.busbw == pytest.approx(2e9 * 3 / 4)
    b = CollectiveRecord("broadcast", "dp", "float32", 10**9, 4, 1.0)
    assert b.busbw == b.algbw


def test_summary_adds_up_per_group_and_op() -> None:
    records = [
        CollectiveRecord("all_reduce", "tp", "float32", 1000, 2, 0.001),
        CollectiveRecord("all_reduce", "tp", "float32", 3000, 2, 0.003),
        CollectiveRecord("all_to_all", "ulysses", "float32", 500, 2, 0.001),
    ]
    tp, uly = summarize(records)
    assert (tp.group, tp.op, tp.calls, tp.nbytes) == ("tp", "all_reduce", 2, 4000)
    assert tp.seconds == pytest.approx(0.004)
    assert tp.busbw == pytest.approx(1e6)
    metrics = uly.as_metrics()
    assert metrics["comm/ulysses/all_to_all/calls"] == 1.0
    assert metrics["comm/ulysses/all_to_all/time_ms"] == pytest.approx(1.0)
    table = format_summary([tp, uly])
    assert "all_reduce" in table and "ulysses" in table


def test_unavailable_paths_fall_back_with_one_warning(caplog) -> None:
    caplog.set_level(logging.WARNING)
    cpu = torch.device("cpu")
    for _ in range(3):
        comm = create_communicator("pynccl", None, None, [0, 1], 0, cpu)
        assert isinstance(comm, CpuCommunicator)
    warnings = [r for r in caplog.records if "pynccl" in r.getMessage()]
    assert len(warnings) == 1
    with pytest.raises(ValueError, match="communicator must be one of"):
        create_communicator("nccl2", None, None, [0, 1], 0, cpu)
