"""``train``: Trainer steps per second of VidParStrategy against Lightning's own
strategies on the same model, batch and processes, in the same run.

* ``dp``: ``VidParStrategy(dp=N)`` against ``DDPStrategy`` (N devices), the same
  ``nn.Linear`` residual-MLP model (:class:`~vidpar.benchmarks.lightning_models.MLPRegression`).
* ``tp``: ``VidParStrategy(tp=N)`` with vidpar's column/row-parallel linears against
  ``ModelParallelStrategy(tensor_parallel_size=N)`` with torch's TP plan
  (``ColwiseParallel``/``RowwiseParallel`` through ``parallelize_module``) on the same
  sizes: the same arithmetic and one all-reduce per block each way.

All fits run inside the same Executor workers, which present themselves to Lightning as
torchrun would (``RANK``/``LOCAL_RANK``/``WORLD_SIZE`` set, no launcher), so every
strategy starts the same way; the pair's fits alternate (A B, then B A, ...). Steps/s
counts the steps after ``skip`` (start-up, first-step allocation and compilation are
excluded): ``(steps - skip) / time from the start of step skip to the end of the last``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vidpar.benchmarks.common import (
    Common,
    check_choices,
    check_world,
    format_seconds,
    format_table,
    median,
)

#: comparison -> ((vidpar strategy, model impl), (baseline strategy, model impl))
COMPARISONS: dict[str, tuple[tuple[str, str], tuple[str, str]]] = {
    "dp": (("vidpar_dp", "torch"), ("lightning_ddp", "torch")),
    "tp": (("vidpar_tp", "vidpar"), ("lightning_model_parallel", "torch")),
}
DESCRIPTIONS = {
    "vidpar_dp": "VidParStrategy(dp=N)",
    "lightning_ddp": "DDPStrategy()",
    "vidpar_tp": "VidParStrategy(tp=N), vidpar Column/RowParallelLinear",
    "lightning_model_parallel": "ModelParallelStrategy(tensor_parallel_size=N), torch TP plan",
}


@dataclass
class TrainOptions:
    """A residual MLP of ``layers`` blocks (hidden → 4·hidden → hidden) on batches of
    ``global_batch × seq_len`` tokens; ``steps`` per fit, the first ``skip`` untimed."""

    world: int = 2
    comparisons: list[str] = field(default_factory=lambda: ["dp", "tp"])
    steps: int = 110
    skip: int = 10
    hidden: int = 256
    layers: int = 4
    seq_len: int = 32
    global_batch: int = 16
    precision: str | None = None


def _strategy(name: str, world: int):
    from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

    from vidpar.lightning import VidParStrategy

    if name == "vidpar_dp":
        return VidParStrategy(dp=world)
    if name == "lightning_ddp":
        return DDPStrategy()
    if name == "vidpar_tp":
        return VidParStrategy(tp=world)
    if name == "lightning_model_parallel":
        return ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=world)
    raise ValueError(f"unknown strategy {name!r}")


def _fit(worker, strategy: str, impl: str, options: TrainOptions, precision: str) -> dict:
    """In each worker: one Trainer.fit; this rank's step timings and last loss."""
    import lightning.pytorch as pl

    from vidpar.benchmarks.lightning_models import (
        MLPRegression,
        StepTimer,
        quiet_lightning,
        restore_worker_environment,
    )

    restore_worker_environment(worker)
    quiet_lightning()
    model = MLPRegression(
        hidden=options.hidden,
        layers=options.layers,
        seq_len=options.seq_len,
        global_batch=options.global_batch,
        num_samples=options.steps * options.global_batch,
        impl=impl,
    )
    timer = StepTimer()
    trainer = pl.Trainer(
        accelerator="gpu" if worker.device.type == "cuda" else "cpu",
        devices=options.world,
        num_nodes=1,
        strategy=_strategy(strategy, options.world),
        max_steps=options.steps,
        precision=precision,
        logger=False,
        callbacks=[timer],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    trainer.fit(model)
    result = timer.result(options.skip)
    result["loss_last"] = float(model.last_loss.float().cpu())
    return result


def run(options: TrainOptions, common: Common) -> dict[str, Any]:
    """``common.runs`` fits of each strategy of every comparison, alternating."""
    from vidpar.config import ParallelConfig
    from vidpar.executor import Executor

    check_world("train", options.world)
    check_choices("comparison", options.comparisons, COMPARISONS)
    if options.global_batch % options.world:
        raise ValueError(
            f"global_batch({options.global_batch}) must divide by world({options.world})"
        )
    if options.hidden * 4 % options.world:
        raise ValueError(f"4 × hidden({options.hidden}) must divide by world({options.world})")
    precision = options.precision or ("bf16-mixed" if common.cuda else "32-true")
    fits: dict[str, list[dict]] = {}
    with Executor(
        ParallelConfig(dp=options.world), devices=common.device, init_distributed=False
    ) as ex:
        for name in options.comparisons:
            pair = COMPARISONS[name]
            for run_index in range(common.runs):
                order = pair if run_index % 2 == 0 else pair[::-1]
                for strategy, impl in order:
                    per_rank = ex.collective_rpc(_fit, strategy, impl, options, precision)
                    fits.setdefault(strategy, []).append(per_rank[0])
    results = []
    for name in options.comparisons:
        (ours, _), (theirs, _) = COMPARISONS[name]
        a, b = fits[ours], fits[theirs]
        ratios = [x["steps_per_s"] / y["steps_per_s"] for x, y in zip(a, b, strict=True)]
        step_ratios = [y["median_step_s"] / x["median_step_s"] for x, y in zip(a, b, strict=True)]
        results.append(
            {
                "comparison": name,
                "world": options.world,
                "vidpar": _strategy_row(ours, a),
                "baseline": _strategy_row(theirs, b),
                "ratio_steps_per_s": median(ratios),
                "run_ratios": ratios,
                "ratio_median_step": median(step_ratios),
                "run_median_step_ratios": step_ratios,
            }
        )
    return {
        "size": {
            "hidden": options.hidden,
            "layers": options.layers,
            "seq_len": options.seq_len,
            "global_batch": options.global_batch,
            "precision": precision,
            "steps": options.steps,
            "skip": options.skip,
        },
        "results": results,
        "notes": [
            "ratio = vidpar steps/s / baseline steps/s (> 1: vidpar faster), the median over"
            " runs of each run's ratio; fits of a pair alternate (A B, B A, ...); 'by median"
            " step' = baseline median step time / vidpar's (less sensitive to stray slow steps)",
            "dp: identical nn.Linear model and data; both wrap it in torch DDP (vidpar over its"
            " dp × sp group with a comm hook that divides by dp, DDP over the world)",
            "tp: the same sizes, initial weights (vidpar draws the full tensor as nn.Linear"
            " does) and arithmetic (loss_last agrees), but different layer code: vidpar's"
            " plain-tensor column/row-parallel linears vs torch DTensor (ColwiseParallel/"
            "RowwiseParallel), whose AdamW also steps DTensors",
            "every fit runs in the same Executor workers, which look like torchrun to"
            " Lightning, so no strategy launches processes",
        ],
    }


def _strategy_row(strategy: str, fits: list[dict]) -> dict[str, Any]:
    return {
        "strategy": strategy,
        "description": DESCRIPTIONS[strategy],
        "steps_per_s": median([f["steps_per_s"] for f in fits]),
        "run_steps_per_s": [f["steps_per_s"] for f in fits],
        "median_step_s": median([f["median_step_s"] for f in fits]),
        "loss_last": [f["loss_last"] for f in fits],
    }


def table(report: dict[str, Any]) -> str:
    rows = []
    for r in report["results"]:
        for side in ("vidpar", "baseline"):
            s = r[side]
            rows.append(
                {
                    "comparison": r["comparison"],
                    "strategy": s["description"],
                    "rate": f"{s['steps_per_s']:.2f}",
                    "step": format_seconds(s["median_step_s"]),
                    "ratio": f"{r['ratio_steps_per_s']:.2f}" if side == "vidpar" else "",
                    "step_ratio": f"{r['ratio_median_step']:.2f}" if side == "vidpar" else "",
                }
            )
    size = report["size"]
    head = (
        f"train: MLP hidden {size['hidden']} × {size['layers']} blocks, batch "
        f"{size['global_batch']} × {size['seq_len']} tokens, {size['precision']}, steps "
        f"{size['skip']}..{size['steps']} timed\n"
    )
    return head + format_table(
        rows,
        [
            ("comparison", "cmp"),
            ("strategy", "strategy"),
            ("rate", "steps/s"),
            ("step", "median step"),
            ("ratio", "vidpar/baseline steps/s"),
            ("step_ratio", "same, by median step"),
        ],
    )
