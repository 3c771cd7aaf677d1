"""The ``kernels`` rows of the ``attention`` suite: one ring rank's kernel work on one device
against one SDPA of the same queries over the concatenated keys, in the same run.

For a ring of ``r`` ranks over ``tokens`` tokens, rank 0 holds ``tokens / r`` queries; its
work is ``r`` blocks of those queries × ``tokens / r`` keys plus the log-sum-exp merges
(forward), and each block's fused backward plus the dQ and travelling dK/dV accumulations
(backward). It runs through vidpar's own ring code (:func:`~vidpar.nn.ring_attention.
ring_attention` on a :class:`~vidpar.nn.testing.LocalRing`: no communication). The
reference is ``F.scaled_dot_product_attention`` of the same queries over all keys (torch's
own kernel choice). ``matmul (before #16)`` is the ring as it was before issue #16 (float32
matmuls materialising each block's ``[S, S]`` scores), kept here only as the "before".

Ratios are SDPA time / ring time per run (1.0 = as fast as one SDPA), the median over
runs. On CUDA each variant's peak memory above what was allocated before the call
(outputs and, for forward + backward, the gradients included) is measured once.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from vidpar.benchmarks.common import (
    Common,
    IterationTimer,
    format_bytes,
    format_seconds,
    format_table,
    median,
    synchronize,
    torch_dtype,
)

VARIANTS = ("sdpa", "ring", "matmul")
LABELS = {"sdpa": "one SDPA", "ring": "ring rank", "matmul": "matmul (before #16)"}


def run(size: dict[str, Any], rings: list[int], before: bool, common: Common) -> dict[str, Any]:
    """Every ring size of ``rings`` at ``size`` (batch, tokens, heads, head_dim, dtype)."""
    from vidpar.nn import attention_kernels

    device = torch.device("cuda" if common.cuda else "cpu")
    variants = [v for v in VARIANTS if before or v != "matmul"]
    rows = [_measure(size, r, variants, device, common) for r in rings]
    threads = torch.get_num_threads() if device.type == "cpu" else None
    return {"rows": rows, "backends": attention_kernels.chosen_backends(), "threads": threads}


def _inputs(size: dict[str, Any], r: int, device: torch.device):
    """Rank 0's queries, the whole K/V and K/V as ``r`` stacked (end-padded) blocks."""
    gen = torch.Generator().manual_seed(16)
    b, s, h, d = size["batch"], size["tokens"], size["heads"], size["head_dim"]
    dtype = torch_dtype(size["dtype"])
    block = math.ceil(s / r)
    q, k, v, dout = (
        torch.randn(b, n, h, d, generator=gen).to(device, dtype) for n in (block, s, s, block)
    )
    padded = [F.pad(t, (0, 0, 0, 0, 0, block * r - s)) for t in (k, v)]
    blocks = [torch.stack([t[:, j * block : (j + 1) * block] for t in padded]) for j in range(r)]
    valid = [max(0, min(block, s - j * block)) for j in range(r)]
    return q, k, v, dout, blocks, valid


def _variant(name: str, q, k, v, blocks, valid) -> Callable[[], torch.Tensor]:
    """A call computing rank 0's attention output (with autograd where inputs need it)."""
    from vidpar.nn.ring_attention import ring_attention
    from vidpar.nn.testing import LocalRing

    if name == "sdpa":
        return lambda: F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        ).transpose(1, 2)
    if name == "ring":
        return lambda: ring_attention(q, blocks[0][0], blocks[0][1], LocalRing(blocks), valid)
    return lambda: _MatmulRing.apply(q, blocks, valid, q.shape[-1] ** -0.5)


def _measure(
    size: dict[str, Any], r: int, variants: list[str], device: torch.device, common: Common
) -> dict[str, Any]:
    q, k, v, dout, blocks, valid = _inputs(size, r, device)
    leaves = [q, k, v, *blocks]

    def reset(backward: bool) -> None:
        for t in leaves:
            t.grad = None
            t.requires_grad_(backward)

    def step(fn: Callable[[], torch.Tensor], backward: bool) -> torch.Tensor:
        reset(backward)
        with torch.set_grad_enabled(backward):
            out = fn()
            if backward:
                out.backward(dout)
        return out

    fns = {name: _variant(name, q, k, v, blocks, valid) for name in variants}
    row: dict[str, Any] = {"ring": r, "queries": q.shape[1], "keys": k.shape[1]}
    for pass_name in ("forward", "backward"):
        backward = pass_name == "backward"
        per_run: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(common.runs):
            for name, fn in fns.items():
                timer = IterationTimer(device)
                for i in range(common.warmup + common.repeats):
                    if i < common.warmup:
                        step(fn, backward)
                    else:
                        timer.time(lambda fn=fn, b=backward: step(fn, b))
                synchronize(device)
                per_run[name].append(median(timer.seconds()))
        cell: dict[str, Any] = {}
        for name in variants:
            cell[name] = {"median_s": median(per_run[name]), "run_medians_s": per_run[name]}
            ratios = [s / t for s, t in zip(per_run["sdpa"], per_run[name], strict=True)]
            cell[name]["sdpa_over_this"] = median(ratios)
            if device.type == "cuda":
                reset(backward)  # the last iteration's gradients are not "before"
                cell[name]["peak_bytes"] = _peak_bytes(lambda n=name, b=backward: step(fns[n], b))
        if device.type == "cuda":
            for name in variants:
                cell[name]["peak_over_sdpa"] = cell[name]["peak_bytes"] / cell["sdpa"]["peak_bytes"]
        row[pass_name] = cell
    row["max_rel_diff"] = _differences(fns, step, q)
    reset(False)
    return row


def _peak_bytes(fn: Callable[[], Any]) -> int:
    """Peak CUDA memory of one call above what was allocated before it."""
    synchronize("cuda")
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    result = fn()
    synchronize("cuda")
    peak = torch.cuda.max_memory_allocated() - before
    del result
    return peak


def _differences(fns: dict[str, Callable], step, q: torch.Tensor) -> dict[str, dict[str, float]]:
    """Each variant's output and dQ against SDPA's, relative to SDPA's largest value."""
    expect_out = step(fns["sdpa"], True).detach().float()
    expect_dq = q.grad.float()
    diffs = {}
    for name in fns:
        if name != "sdpa":
            out = step(fns[name], True).detach().float()
            diffs[name] = {
                "out": float((out - expect_out).abs().max() / expect_out.abs().max()),
                "dq": float((q.grad.float() - expect_dq).abs().max() / expect_dq.abs().max()),
            }
    return diffs


def table(report: dict[str, Any]) -> str:
    """One line per ring size, pass and variant."""
    lines = []
    for row in report["rows"]:
        for pass_name in ("forward", "backward"):
            for name, cell in row[pass_name].items():
                diff = row["max_rel_diff"].get(name, {})
                lines.append(
                    {
                        "ring": f"r={row['ring']}",
                        "pass": "fwd" if pass_name == "forward" else "fwd+bwd",
                        "variant": LABELS[name],
                        "time": format_seconds(cell["median_s"]),
                        "ratio": f"{cell['sdpa_over_this']:.2f}x",
                        "peak": (
                            f"{format_bytes(cell['peak_bytes'])} ({cell['peak_over_sdpa']:.2f}x)"
                            if "peak_bytes" in cell
                            else ""
                        ),
                        "diff": f"{diff['out']:.1e} / {diff['dq']:.1e}" if diff else "",
                    }
                )
    columns = [
        ("ring", "ring"),
        ("pass", "pass"),
        ("variant", "variant"),
        ("time", "time"),
        ("ratio", "SDPA time / this"),
        ("peak", "peak extra memory (/ SDPA's)"),
        ("diff", "rel diff out / dq vs SDPA"),
    ]
    if not any(line["peak"] for line in lines):
        columns.remove(("peak", "peak extra memory (/ SDPA's)"))
    backends = ", ".join(f"{k}: {v}" for k, v in report["backends"].items())
    return format_table(lines, columns) + f"\nring block kernels: {backends or 'none'}"


# The ring before issue #16, kept only as the benchmark's "before" ----------------------------


def _old_block_forward(q, k, v, scale):
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    lse = torch.logsumexp(scores, dim=-1)
    return torch.matmul(torch.exp(scores - lse.unsqueeze(-1)), v), lse


def _old_block_backward(dout, q, k, v, lse, delta, scale):
    p = torch.exp(torch.matmul(q, k.transpose(-2, -1)) * scale - lse.unsqueeze(-1))
    dv = torch.matmul(p.transpose(-2, -1), dout)
    ds = p * (torch.matmul(dout, v.transpose(-2, -1)) - delta.unsqueeze(-1))
    return torch.matmul(ds, k) * scale, torch.matmul(ds.transpose(-2, -1), q) * scale, dv


def _old_merge(out, lse, block_out, block_lse):
    if out is None:
        return block_out, block_lse
    new_lse = torch.logaddexp(lse, block_lse)
    out = out * torch.exp(lse - new_lse).unsqueeze(-1)
    return out + block_out * torch.exp(block_lse - new_lse).unsqueeze(-1), new_lse


def _old_heads_first(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2).to(torch.float32)


class _MatmulRing(torch.autograd.Function):
    """Rank 0's work in the ring before #16 (blocks in ring order, as they arrived), with
    the dK/dV accumulators' float32 adds; no communication."""

    @staticmethod
    def forward(ctx, q, blocks, valid, scale):
        qh, out, lse = _old_heads_first(q), None, None
        for step in range(len(blocks)):
            j = -step % len(blocks)
            kb, vb = (_old_heads_first(t[:, : valid[j]]) for t in blocks[j])
            out, lse = _old_merge(out, lse, *_old_block_forward(qh, kb, vb, scale))
        ctx.save_for_backward(q, out, lse)
        ctx.blocks, ctx.valid, ctx.scale = blocks, valid, scale
        return out.transpose(1, 2).to(q.dtype).contiguous()

    @staticmethod
    def backward(ctx, dout):
        q, out, lse = ctx.saved_tensors
        qh, do = _old_heads_first(q), _old_heads_first(dout)
        delta = (do * out).sum(-1)
        dq = torch.zeros_like(qh)
        for step in range(len(ctx.blocks)):
            j = -step % len(ctx.blocks)
            kv, n = ctx.blocks[j], ctx.valid[j]
            kb, vb = (_old_heads_first(t[:, :n]) for t in kv)
            dqb, dkb, dvb = _old_block_backward(do, qh, kb, vb, lse, delta, ctx.scale)
            dq += dqb
            grads = kv.new_zeros(kv.shape, dtype=torch.float32)
            grads[0, :, :n] = dkb.transpose(1, 2)
            grads[1, :, :n] = dvb.transpose(1, 2)
            grads += torch.zeros_like(grads)  # what the ring received (here: nothing)
        return dq.transpose(1, 2).to(q.dtype), None, None, None
