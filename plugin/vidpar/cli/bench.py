"""``vidpar-bench``: run one benchmark suite, print its table and write a JSON report.

    vidpar-bench suite=collectives                      # vidpar vs torch.distributed
    vidpar-bench suite=attention attention.world=4      # Ulysses, Ring and USP vs 1 process
    vidpar-bench suite=dit dit.modes=[sp2,tp2]
    vidpar-bench suite=rpc
    vidpar-bench suite=train                            # vs DDPStrategy, ModelParallelStrategy
    vidpar-bench suite=telemetry
    vidpar-bench suite=collectives device=cuda collectives.max_bytes=1GiB output=out.json

Sizes left at null take the device's default (small on CPU, full-size on CUDA). Every
option and its default: ``vidpar-bench suite=NAME --cfg job``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from vidpar.benchmarks import SUITES, options_class, suite_module
from vidpar.benchmarks.common import Common, host_info, load_average, now, resolve_device
from vidpar.cli.hydra_setup import UserError, console_command


def _schema() -> type:
    """The config's dataclass: common settings plus one options node per suite."""
    fields: list[tuple[str, Any, Any]] = [
        ("suite", str, "rpc"),
        ("output", str, "bench.json"),
        ("device", str, "auto"),
        ("repeats", int, 20),
        ("warmup", int, 3),
        ("runs", int, 3),
    ]
    for name in SUITES:
        cls = options_class(name)
        fields.append((name, cls, field(default_factory=cls)))
    return dataclasses.make_dataclass("BenchSchema", fields)


ConfigStore.instance().store(name="bench_schema", node=_schema())


@dataclass
class _Report:
    suite: str
    command: str
    started: str
    host: dict[str, Any]
    common: dict[str, Any]
    options: dict[str, Any]
    body: dict[str, Any] = field(default_factory=dict)

    def as_dict(self, finished: str, load_after: list[float] | None) -> dict[str, Any]:
        head = {k: v for k, v in dataclasses.asdict(self).items() if k != "body"}
        return {**head, "finished": finished, "load_average_after": load_after, **self.body}


def run(cfg: DictConfig, command: str = "vidpar-bench") -> dict[str, Any]:
    """Run ``cfg.suite``; print its table, write ``cfg.output``, return the report.
    ``command`` is recorded in the report."""
    if cfg.suite not in SUITES:
        raise UserError(
            f"suite={cfg.suite} is not a benchmark suite; choose one of: {', '.join(SUITES)}."
        )
    try:
        common = Common(
            device=resolve_device(cfg.device),
            repeats=cfg.repeats,
            warmup=cfg.warmup,
            runs=cfg.runs,
        )
        if min(common.repeats, common.runs) < 1 or common.warmup < 0:
            raise ValueError("repeats and runs must be at least 1 and warmup at least 0")
    except ValueError as err:
        raise UserError(str(err)) from None
    module = suite_module(cfg.suite)
    options = OmegaConf.to_object(cfg[cfg.suite])
    report = _Report(
        suite=cfg.suite,
        command=command,
        started=now(),
        host=host_info(common.device),
        common=dataclasses.asdict(common),
        options=dataclasses.asdict(options),
    )
    print(f"vidpar-bench: suite {cfg.suite} on {common.device}, load {report.host['load_average']}")
    try:
        report.body = module.run(options, common)
    except ValueError as err:
        raise UserError(f"suite {cfg.suite}: {err}") from None
    result = report.as_dict(now(), load_average())
    print(module.table(result))
    for note in result.get("notes", []):
        print(f"note: {note}")
    output = Path(cfg.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"vidpar-bench: wrote {output}")
    return result


def _run_with_overrides(conf: DictConfig) -> None:
    overrides = HydraConfig.get().overrides.task
    run(conf, command=" ".join(["vidpar-bench", *overrides]))


main = console_command("bench", _run_with_overrides)

if __name__ == "__main__":
    main()
