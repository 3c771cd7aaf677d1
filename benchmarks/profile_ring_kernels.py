"""Where one ring rank's attention time goes on a GPU (issue #16): for r = 2 and 4 at
32,760 tokens × 12 heads × 128 (bf16), the median time of one SDPA over all keys, of the
ring rank's work (``ring_attention`` on a ``LocalRing``), of its r block kernels alone
and of its r - 1 merges alone, per backend; then the device time per CUDA kernel of one
ring forward and forward + backward (torch.profiler) and how much of the call's span the
GPU was busy. Tables go to stdout and ``$OUT/ring_profile.txt``.
Run on a GPU: ``python benchmarks/profile_ring_kernels.py``."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from cuda_timing import kernel_table, median_ms
from torch.profiler import ProfilerActivity, profile

from vidpar.benchmarks.ring_kernels import _inputs
from vidpar.nn import attention_kernels as ak
from vidpar.nn.ring_attention import ring_attention
from vidpar.nn.softmax_merge import merge_into
from vidpar.nn.testing import LocalRing

SIZE = {"batch": 1, "tokens": 32760, "heads": 12, "head_dim": 128, "dtype": "bfloat16"}
SCALE = SIZE["head_dim"] ** -0.5
lines: list[str] = []


def say(text: str) -> None:
    print(text, flush=True)
    lines.append(text)


def say_kernels(title: str, fn, top: int) -> None:
    """The kernel table of one profiled call of ``fn``."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    say(f"  {title}, one call:")
    for line in kernel_table(prof, top, 90):
        say(f"    {line}")


def main() -> None:
    device = torch.device("cuda")
    say(
        f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}, cudnn {torch.backends.cudnn.version()}"
    )
    for r in (2, 4):
        profile_ring(r, device)
    with open(os.path.join(os.environ.get("OUT", "."), "ring_profile.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")


def profile_ring(r: int, device: torch.device) -> None:
    """Times and kernel tables of a ring of ``r``."""
    q, k, v, dout, blocks, valid = _inputs(SIZE, r, device)
    qh = q.transpose(1, 2)
    say(f"== r={r}: {q.shape[1]} queries x {k.shape[1]} keys")

    def sdpa():
        return F.scaled_dot_product_attention(qh, k.transpose(1, 2), v.transpose(1, 2))

    def ring():
        return ring_attention(q, blocks[0][0], blocks[0][1], LocalRing(blocks), valid)

    with torch.no_grad():
        say(f"  sdpa fwd {median_ms(sdpa):.3f} ms; ring fwd {median_ms(ring):.3f} ms")
        kb, vb = (t.transpose(1, 2) for t in blocks[1])
        for backend in ("cudnn", "flash", "efficient"):
            with ak.use_backend(backend):
                one = median_ms(lambda kb=kb, vb=vb: ak.attention_forward(qh, kb, vb, SCALE))
                whole = median_ms(ring)
            say(f"  {backend}: one block {one:.3f} ms (x{r} = {one * r:.3f}); ring {whole:.3f} ms")
        parts = [ak.attention_forward(qh, *(t.transpose(1, 2) for t in b), SCALE) for b in blocks]
        acc = parts[0][0].clone()

        def merges():
            lse = parts[0][1]
            for out, block_lse in parts[1:]:
                lse = merge_into(acc, lse, out, block_lse)

        say(f"  {r - 1} merges {median_ms(merges):.3f} ms")
        say_kernels("ring forward", ring, 12)

    leaves = [q, blocks[0]]

    def fwd_bwd():
        for t in leaves:
            t.grad = None
            t.requires_grad_(True)
        ring().backward(dout)

    def sdpa_fwd_bwd():
        for t in (q, k, v):
            t.grad = None
            t.requires_grad_(True)
        sdpa().backward(dout.transpose(1, 2))

    say(
        f"  sdpa fwd+bwd {median_ms(sdpa_fwd_bwd):.3f} ms; ring fwd+bwd {median_ms(fwd_bwd):.3f} ms"
    )
    say_kernels("ring forward + backward", fwd_bwd, 16)
    for t in (q, k, v, *blocks):
        t.requires_grad_(False)
        t.grad = None


if __name__ == "__main__":
    main()
