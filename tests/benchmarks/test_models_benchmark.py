"""The ``models`` benchmark suite (diffusers' Wan through parallelize at world 1 vs plain
diffusers) runs end to end: on CPU with a tiny model, on one GPU with a small one."""

from __future__ import annotations

import pytest

from vidpar.benchmarks import Common, models


def _check(report: dict, cuda: bool) -> None:
    (row,) = report["results"]
    # The same kernels on the same numbers: equal on CPU, within bf16 rounding on a GPU.
    assert row["max_abs_diff"] <= (2e-2 * row["max_abs_ref"] if cuda else 0.0)
    assert row["max_abs_ref"] > 0
    for pass_name in models.PASSES:
        measured = row[pass_name]
        assert measured["single"]["median_s"] > 0 and measured["parallel"]["median_s"] > 0
        assert measured["time_ratio"] > 0
        peaks = measured["peak_bytes"].values()
        assert all(p > 0 for p in peaks) if cuda else all(p is None for p in peaks)
    assert "time ratio" in models.table(report)


def test_models_suite_on_cpu():
    common = Common(device="cpu", repeats=1, warmup=0, runs=1)
    _check(models.run(models.ModelsOptions(), common), cuda=False)


@pytest.mark.gpu
def test_models_suite_on_one_gpu_with_a_small_wan():
    options = models.ModelsOptions(
        model={"num_layers": 2}, latent=[5, 30, 52], text=64, checkpointing=True
    )
    _check(models.run(options, Common(device="cuda", repeats=2, warmup=1, runs=1)), cuda=True)
