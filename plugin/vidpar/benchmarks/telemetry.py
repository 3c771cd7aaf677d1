"""``telemetry``: what recording every collective costs a training step.

1. Interleaved (the headline): one fit of the tiny DiT (conf/model/tiny.yaml, tp2 × sp2
   by default) with :class:`~vidpar.lightning.CollectiveTelemetry`, recording switched
   on and off step by step (on, off, off, on, ...); the median step time of the "on"
   steps against the "off" steps of the same run. Target: < 3 %.
2. Separate runs (``separate_runs``): fits with telemetry off (no callback, no
   recorder) and on (the callback), alternating; median step times.
3. The hooks themselves, in this process: ``telemetry.measure`` with recording off (what
   every GroupCoordinator collective pays when telemetry is off) and on, and
   ``GroupCoordinator.all_reduce`` on a group of one (which returns before the hook).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vidpar.benchmarks.common import Common, format_seconds, format_table, median


def tiny_recipe() -> dict[str, Any]:
    """``VideoDiffusionModule`` arguments of conf/model/tiny.yaml (the default job's model):
    the DiT sizes and the training options that cost step time, 4 classes."""
    from omegaconf import OmegaConf

    from vidpar.resources import CONFIG_DIR

    model = OmegaConf.to_container(OmegaConf.load(Path(CONFIG_DIR) / "model" / "tiny.yaml"))
    return {
        "dit": {**model["dit"], "num_classes": 4},
        **{k: model[k] for k in ("lr", "timestep_sampling", "ema_decay")},
    }


TARGET_PERCENT = 3.0
_PATTERN = (True, False, False, True)  # TelemetryToggle's


@dataclass
class TelemetryOptions:
    """Layout ``tp × sp`` (one process each); ``steps`` per fit, the first ``skip``
    untimed; ``hook_calls`` calls per hook measurement."""

    tp: int = 2
    sp: int = 2
    steps: int = 120
    skip: int = 10
    separate_runs: bool = False
    hook_calls: int = 200_000
    batch: int = 8


def _fit(worker, mode: str, options: TelemetryOptions) -> dict[str, Any]:
    """In each worker: one fit; ``mode`` is ``interleaved``, ``on`` or ``off``."""
    import lightning.pytorch as pl

    from vidpar.benchmarks.lightning_models import (
        StepTimer,
        TelemetryToggle,
        quiet_lightning,
        restore_worker_environment,
    )
    from vidpar.data import MovingShapesDataModule
    from vidpar.lightning import CollectiveTelemetry, VideoDiffusionModule, VidParStrategy

    restore_worker_environment(worker)
    quiet_lightning()
    data = MovingShapesDataModule(
        num_train=options.steps * options.batch,
        num_val=1,
        batch_size=options.batch,
        num_frames=8,
        height=16,
        width=16,
        num_classes=4,
    )
    module = VideoDiffusionModule(**tiny_recipe(), num_sample_videos=0)
    timer = StepTimer()
    callbacks: list[pl.Callback] = []
    toggle = TelemetryToggle() if mode == "interleaved" else None
    if toggle is not None:
        callbacks.append(toggle)  # before CollectiveTelemetry: it counts, then that drains
    if mode in ("interleaved", "on"):
        callbacks.append(CollectiveTelemetry(log_every_n_steps=10))
    callbacks.append(timer)
    trainer = pl.Trainer(
        accelerator="gpu" if worker.device.type == "cuda" else "cpu",
        devices=options.tp * options.sp,
        num_nodes=1,
        strategy=VidParStrategy(tp=options.tp, sp=options.sp),
        max_steps=options.steps,
        precision="32-true",
        logger=False,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=data)
    result = timer.result(options.skip)
    if toggle is not None:
        result["on_steps"] = toggle.on_steps
        result["records"] = toggle.records
    return result


def _per_call(loop: Callable[[int], None], calls: int, repeats: int = 5) -> float:
    """Seconds per call: the fastest of ``repeats`` timings of ``loop(calls)``."""
    best = float("inf")
    for _ in range(repeats):
        begin = time.perf_counter()
        loop(calls)
        best = min(best, time.perf_counter() - begin)
    return best / calls


def hook_costs(calls: int) -> dict[str, float]:
    """Per-call cost (ns) of the telemetry hook off and on, and of a group-of-one
    all_reduce, each minus an empty loop's."""
    from vidpar.distributed import telemetry
    from vidpar.distributed.group import GroupCoordinator

    tensor = torch.zeros(1024)
    measure = telemetry.measure

    def empty(n: int) -> None:
        for _ in range(n):
            pass

    def hook(n: int) -> None:
        for _ in range(n):
            with measure("all_reduce", "tp", tensor, 2):
                pass

    coord = GroupCoordinator("tp", [0], None, None, torch.device("cpu"))

    def size_one(n: int) -> None:
        for _ in range(n):
            coord.all_reduce(tensor)

    previous = telemetry.stop_recording()
    try:
        base = _per_call(empty, calls)
        off = _per_call(hook, calls)
        one = _per_call(size_one, calls)
        recorder = telemetry.start_recording()
        on = _per_call(hook, calls)
        recorder.clear()
    finally:
        telemetry.stop_recording()
        if previous is not None:
            telemetry.start_recording(previous)
    return {
        "empty_loop_ns": base * 1e9,
        "measure_off_ns": (off - base) * 1e9,
        "measure_on_ns": (on - base) * 1e9,
        "group_of_one_all_reduce_ns": (one - base) * 1e9,
    }


def _block_ratios(times: list[float], flags: list[bool], start: int) -> list[float]:
    """Each (on, off, off, on) block's on-time / off-time, from step ``start``."""
    period = len(_PATTERN)
    ratios = []
    for i in range(start, len(times) - period + 1, period):
        pairs = list(zip(times[i : i + period], flags[i : i + period], strict=True))
        ratios.append(sum(t for t, f in pairs if f) / sum(t for t, f in pairs if not f))
    return ratios


def _blocks(fit: dict[str, Any], skip: int) -> dict[str, Any]:
    """One interleaved fit: each block's on/off ratio of wall and of CPU time (blocks
    after ``skip`` steps), the on/off median step times and records per on-step."""
    period = len(_PATTERN)
    start = -(-skip // period) * period
    steps, flags = fit["step_seconds"], fit["on_steps"]
    ratios = _block_ratios(steps, flags, start)
    cpu_ratios = _block_ratios(fit["step_cpu_seconds"], flags, start)
    timed = range(start, len(steps))
    return {
        "ratios": ratios,
        "cpu_ratios": cpu_ratios,
        "overhead_percent": 100 * (median(ratios) - 1),
        "cpu_overhead_percent": 100 * (median(cpu_ratios) - 1),
        "on_s": median([steps[i] for i in timed if flags[i]]),
        "off_s": median([steps[i] for i in timed if not flags[i]]),
        "records_per_on_step": median([fit["records"][i] for i in timed if flags[i]]),
    }


def _quartiles(ratios: list[float]) -> list[float]:
    ordered = sorted(ratios)
    return [100 * (ordered[len(ordered) // 4] - 1), 100 * (ordered[(3 * len(ordered)) // 4] - 1)]


def run(options: TelemetryOptions, common: Common) -> dict[str, Any]:
    """The interleaved fit, then (optionally) separate on/off fits, then the hooks."""
    from vidpar.config import ParallelConfig
    from vidpar.executor import Executor

    if options.steps < options.skip + 4 * len(_PATTERN):
        raise ValueError(
            f"telemetry.steps({options.steps}) must be at least skip + {4 * len(_PATTERN)}"
        )
    world = options.tp * options.sp
    interleaved: list[dict] = []
    separate: dict[str, list[dict]] = {"off": [], "on": []}
    with Executor(ParallelConfig(dp=world), devices=common.device, init_distributed=False) as ex:
        for _ in range(common.runs):
            interleaved.append(ex.collective_rpc(_fit, "interleaved", options)[0])
        if options.separate_runs:
            for index in range(common.runs):
                for mode in ("off", "on") if index % 2 == 0 else ("on", "off"):
                    separate[mode].append(ex.collective_rpc(_fit, mode, options)[0])
    rows = [_blocks(fit, options.skip) for fit in interleaved]
    block_ratios = [r for row in rows for r in row.pop("ratios")]
    cpu_ratios = [r for row in rows for r in row.pop("cpu_ratios")]
    overhead = 100 * (median(block_ratios) - 1)
    result: dict[str, Any] = {
        "layout": {"tp": options.tp, "sp": options.sp, "world": world},
        "model": tiny_recipe()["dit"],
        "interleaved": {
            "runs": rows,
            "median_step_on_s": median([r["on_s"] for r in rows]),
            "median_step_off_s": median([r["off_s"] for r in rows]),
            "overhead_percent": overhead,
            "blocks": len(block_ratios),
            "block_overhead_p25_p75_percent": _quartiles(block_ratios),
            "cpu_overhead_percent": 100 * (median(cpu_ratios) - 1),
            "cpu_block_overhead_p25_p75_percent": _quartiles(cpu_ratios),
            "collectives_per_step": median([r["records_per_on_step"] for r in rows]),
        },
    }
    if options.separate_runs:
        off = [f["median_step_s"] for f in separate["off"]]
        on = [f["median_step_s"] for f in separate["on"]]
        result["separate"] = {
            "median_step_off_s": median(off),
            "median_step_on_s": median(on),
            "run_steps_off_s": off,
            "run_steps_on_s": on,
            "overhead_percent": 100 * (median(on) / median(off) - 1),
            "cpu_overhead_percent": 100
            * (
                median([f["median_step_cpu_s"] for f in separate["on"]])
                / median([f["median_step_cpu_s"] for f in separate["off"]])
                - 1
            ),
        }
    hooks = hook_costs(options.hook_calls)
    per_step = result["interleaved"]["collectives_per_step"]
    step = result["interleaved"]["median_step_off_s"]
    hooks["predicted_on_overhead_percent"] = 100 * per_step * hooks["measure_on_ns"] * 1e-9 / step
    hooks["predicted_off_overhead_percent"] = 100 * per_step * hooks["measure_off_ns"] * 1e-9 / step
    result["hooks"] = hooks
    result["summary"] = {
        "overhead_percent": overhead,
        "target_percent": TARGET_PERCENT,
        "target_met": overhead < TARGET_PERCENT,
        "disabled_hook_ns": hooks["measure_off_ns"],
    }
    result["notes"] = [
        "interleaved: recording toggled per step in blocks of (on, off, off, on) in one fit;"
        " overhead = median over blocks of (on-step time / off-step time) - 1; the CPU-time"
        " figure is the same ratio of rank 0's process CPU time (robust to other load)",
        "on-steps include CollectiveTelemetry's per-step drain and its summary every 10 steps"
        " (logger=False: nothing is written)",
        "hook costs are per call in this process, minus an empty loop; predicted overhead ="
        " collectives per step × per-call cost / step time",
    ]
    return result


def table(report: dict[str, Any]) -> str:
    i = report["interleaved"]
    rows = [
        {
            "what": "interleaved: step, recording off",
            "value": format_seconds(i["median_step_off_s"]),
        },
        {"what": "interleaved: step, recording on", "value": format_seconds(i["median_step_on_s"])},
        {
            "what": "interleaved: overhead (median of blocks)",
            "value": f"{i['overhead_percent']:+.2f} %",
        },
        {
            "what": f"interleaved: p25 / p75 over {i['blocks']} blocks",
            "value": "{:+.2f} % / {:+.2f} %".format(*i["block_overhead_p25_p75_percent"]),
        },
        {
            "what": "interleaved: overhead in process CPU time (rank 0)",
            "value": f"{i['cpu_overhead_percent']:+.2f} %",
        },
        {
            "what": "interleaved: CPU-time p25 / p75",
            "value": "{:+.2f} % / {:+.2f} %".format(*i["cpu_block_overhead_p25_p75_percent"]),
        },
        {"what": "collectives recorded per step", "value": f"{i['collectives_per_step']:.0f}"},
    ]
    if "separate" in report:
        s = report["separate"]
        rows += [
            {
                "what": "separate fits: step, telemetry off",
                "value": format_seconds(s["median_step_off_s"]),
            },
            {
                "what": "separate fits: step, telemetry on",
                "value": format_seconds(s["median_step_on_s"]),
            },
            {"what": "separate fits: overhead", "value": f"{s['overhead_percent']:+.2f} %"},
            {
                "what": "separate fits: overhead in process CPU time",
                "value": f"{s['cpu_overhead_percent']:+.2f} %",
            },
        ]
    h = report["hooks"]
    rows += [
        {
            "what": "telemetry.measure, recording off (per call)",
            "value": f"{h['measure_off_ns']:.0f} ns",
        },
        {
            "what": "telemetry.measure, recording on (per call)",
            "value": f"{h['measure_on_ns']:.0f} ns",
        },
        {
            "what": "GroupCoordinator.all_reduce, group of one",
            "value": f"{h['group_of_one_all_reduce_ns']:.0f} ns",
        },
        {
            "what": "predicted overhead on / off (hook cost × calls / step)",
            "value": f"{h['predicted_on_overhead_percent']:.3f} % / "
            f"{h['predicted_off_overhead_percent']:.4f} %",
        },
    ]
    layout = report["layout"]
    head = (
        f"telemetry: tiny DiT, tp{layout['tp']} × sp{layout['sp']} ({layout['world']} "
        f"processes); target < {TARGET_PERCENT:g} %: "
        f"{'met' if report['summary']['target_met'] else 'MISSED'}\n"
    )
    return head + format_table(rows, [("what", "measurement"), ("value", "value")])
