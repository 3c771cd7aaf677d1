"""Round trip of Executor.collective_rpc on CPU workers (a thin wrapper over
``vidpar.benchmarks.rpc``, the suite behind ``vidpar-bench suite=rpc``).

Measures a no-op RPC (``ping``) with 1, 2 and 4 workers, and an RPC that carries a 64 MiB
tensor to the workers and back, against two baselines that send the same tensor to one
echo process over a plain ``multiprocessing`` pipe (in-band pickle; torch's own
shared-memory reductions). Prints a table and writes JSON::

    python benchmarks/bench_rpc.py benchmarks/results/bench_rpc_cpu.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

from vidpar.benchmarks import Common, rpc
from vidpar.benchmarks.common import host_info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="where to write the JSON results")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--runs", type=int, default=5, help="repetitions of each measurement")
    parser.add_argument("--calls", type=int, default=2000, help="no-op calls per run")
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--tensor-mib", type=int, default=64)
    parser.add_argument("--tensor-calls", type=int, default=5, help="tensor calls per run")
    parser.add_argument("--tensor-workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--no-baselines", action="store_true")
    args = parser.parse_args()

    options = rpc.RpcOptions(
        workers=args.workers,
        calls=args.calls,
        call_warmup=args.warmup,
        tensor_mib=args.tensor_mib,
        tensor_calls=args.tensor_calls,
        tensor_workers=args.tensor_workers,
        baselines=not args.no_baselines,
    )
    body = rpc.run(options, Common(device="cpu", runs=args.runs))
    print(rpc.table(body))
    report = {
        "benchmark": "executor_rpc_round_trip",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.date.today().isoformat(),
        "host": host_info("cpu"),
        "results": body["results"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
