"""Where one eager forward's GPU time goes: vidpar's VideoDiT and diffusers' Wan at the
Wan2.1-1.3B sizes of ``vidpar-bench suite=dit dit.compare=wan`` (bf16, 32,760 tokens),
as device time per aten op and input shapes (torch.profiler), written to
``$OUT/ops_<model>.txt``. Run on a GPU: ``python benchmarks/profile_dit_vs_wan.py``."""

from __future__ import annotations

import os
import time

import torch
from torch.profiler import ProfilerActivity, profile

from vidpar.benchmarks.common import Common
from vidpar.benchmarks.dit import DiTOptions
from vidpar.benchmarks.dit_compare import _variants, resolved
from vidpar.distributed import state as ps

ROWS = 45


def op_table(prof) -> list[tuple[float, int, str, str]]:
    """``(self device ms, calls, op, input shapes)`` of every aten op, slowest first."""
    rows = [
        (e.self_device_time_total / 1e3, e.count, e.key, str(e.input_shapes)[:110])
        for e in prof.key_averages(group_by_input_shape=True)
        if e.key.startswith("aten::") and e.self_device_time_total > 0
    ]
    return sorted(rows, reverse=True)


def main() -> None:
    out = os.environ.get("OUT", ".")
    size = resolved(DiTOptions(compare="wan", passes=["forward"]), Common(device="cuda"))
    with ps.single_process():
        variants = _variants(size, torch.device("cuda"), torch.bfloat16)
        for name in ("vidpar", "wan"):
            _, step = variants[name]
            for _ in range(3):
                step(False)
            torch.cuda.synchronize()
            begin = time.perf_counter()
            for _ in range(5):
                step(False)
            torch.cuda.synchronize()
            print(f"{name}: {(time.perf_counter() - begin) / 5 * 1e3:.1f} ms a forward")
            with profile(
                activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True
            ) as prof:
                step(False)
                torch.cuda.synchronize()
            rows = op_table(prof)
            lines = [f"{t:9.2f} ms {c:5d} {k:40s} {s}" for t, c, k, s in rows[:ROWS]]
            with open(f"{out}/ops_{name}.txt", "w") as f:
                f.write("\n".join(lines) + "\n")
            print(f"{name}: {sum(r[0] for r in rows):.1f} ms of device time in aten ops")


if __name__ == "__main__":
    main()
