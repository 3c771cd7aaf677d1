"""Wall and CPU time of a command from two (or more) source trees, run by run interleaved.

CPU time counts the command and every process it starts (workers, fork servers, their
children): this process becomes their subreaper and waits for each. CPU seconds are the
steadier measure on a shared machine, whose load stretches wall times.

    python benchmarks/command_cpu.py --runs 3 --tree /tmp/base/plugin --tree plugin \\
        -- python -m vidpar.cli.train --help
"""

from __future__ import annotations

import argparse
import ctypes
import os
import resource
import statistics
import subprocess
import sys
import time

PR_SET_CHILD_SUBREAPER = 36


def measure(command: list[str], tree: str, rc: int = 0) -> tuple[float, float]:
    """Wall and CPU seconds of ``command`` with ``tree`` first on ``PYTHONPATH``; it must
    exit with status ``rc``."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([tree, os.environ.get("PYTHONPATH", "")])}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    done = subprocess.run(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    wall = time.monotonic() - start
    while True:  # the orphans it left (a fork server exiting after it): theirs too
        try:
            os.wait()
        except ChildProcessError:
            break
    if done.returncode != rc:
        raise SystemExit(f"{command} from {tree} exited {done.returncode}:\n{done.stderr[-2000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rc", type=int, default=0, help="the exit status expected")
    parser.add_argument("--tree", action="append", required=True, help="a PYTHONPATH entry")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    ctypes.CDLL(None).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    results: dict[str, list[tuple[float, float]]] = {tree: [] for tree in args.tree}
    for _ in range(args.runs):
        for tree in args.tree:
            results[tree].append(measure(command, tree, args.rc))
    print(f"{' '.join(command)}  (median of {args.runs}, load {os.getloadavg()[0]:.1f})")
    first = None
    for tree, runs in results.items():
        wall = statistics.median(w for w, _ in runs)
        cpu = statistics.median(c for _, c in runs)
        first = first or (wall, cpu)
        print(
            f"  {tree}: wall {wall:.1f} s, CPU {cpu:.1f} s "
            f"(×{wall / first[0]:.2f}, ×{cpu / first[1]:.2f} of the first tree)"
        )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
