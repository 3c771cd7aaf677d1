"""Where one forward's GPU time goes: vidpar's VideoDiT and diffusers' Wan at the
Wan2.1-1.3B sizes of ``vidpar-bench suite=dit dit.compare=wan`` (bf16, 32,760 tokens),
eager or compiled, as device time per aten op and input shapes and per CUDA kernel
(torch.profiler), and how busy the GPU was over the forward's span, written to
``$OUT/ops_<variant>.txt``. Run on a GPU: ``python benchmarks/profile_dit_vs_wan.py
[--backward] [VARIANT ...]`` (``vidpar``, ``vidpar_compiled``, ``wan``, ``wan_compiled``;
default: the two eager ones); ``--backward`` profiles forward + backward (activation
checkpointing, as the ``dit`` suite) instead, into ``$OUT/ops_<variant>_backward.txt``."""

from __future__ import annotations

import os
import sys
import time

import torch
from cuda_timing import kernel_table
from torch.profiler import ProfilerActivity, profile

from vidpar.benchmarks.common import Common
from vidpar.benchmarks.dit import DiTOptions, build_dit
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


def copy_sources(prof) -> list[str]:
    """Device time of ``aten::copy_`` by the Python lines that called it."""
    rows = [
        (e.self_device_time_total / 1e3, e.count, " <- ".join(e.stack[:4]))
        for e in prof.key_averages(group_by_stack_n=4)
        if e.key == "aten::copy_" and e.self_device_time_total > 0
    ]
    return [f"{t:9.2f} ms {c:5d} copy_ {where}" for t, c, where in sorted(rows, reverse=True)[:8]]


def main() -> None:
    out = os.environ.get("OUT", ".")
    backward = "--backward" in sys.argv[1:]
    names = [a for a in sys.argv[1:] if a != "--backward"] or ["vidpar", "wan"]
    call = "forward + backward" if backward else "forward"
    size = resolved(DiTOptions(compare="wan", passes=["forward"]), Common(device="cuda"))
    with ps.single_process():
        variants = _variants(size, torch.device("cuda"), torch.bfloat16, build_dit)
        for name in names:
            _, step = variants[name]
            for _ in range(3):
                step(backward)
            torch.cuda.synchronize()
            begin = time.perf_counter()
            for _ in range(5):
                step(backward)
            torch.cuda.synchronize()
            print(f"{name}: {(time.perf_counter() - begin) / 5 * 1e3:.1f} ms a {call}")
            with profile(
                activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                record_shapes=True,
                with_stack=True,
            ) as prof:
                step(backward)
                torch.cuda.synchronize()
            rows = op_table(prof)
            lines = [f"{t:9.2f} ms {c:5d} {k:40s} {s}" for t, c, k, s in rows[:ROWS]]
            kernels = kernel_table(prof, ROWS)
            copies = copy_sources(prof)
            suffix = "_backward" if backward else ""
            with open(f"{out}/ops_{name}{suffix}.txt", "w") as f:
                f.write("\n".join([*lines, "", *kernels, "", *copies]) + "\n")
            print(f"{name}: {sum(r[0] for r in rows):.1f} ms of device time in aten ops")
            print("\n".join(kernels[:15]))


if __name__ == "__main__":
    main()
