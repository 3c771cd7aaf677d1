"""Per-head RMSNorm of one attention input at the Wan2.1-1.3B sizes (32,760 tokens × 12
heads × 128, bf16), the ways it can run eagerly and compiled: microseconds a call
(CUDA events: the mean of 50 calls after 5 warm-up calls). Run on a GPU:
``python benchmarks/head_norm_kernels.py``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vidpar.nn.elementwise import head_rms_norm

S, H, D = 32760, 12, 128
EPS = 1e-6


def microseconds(fn, calls: int = 50) -> float:
    for _ in range(5):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / calls * 1e3


def main() -> None:
    cuda = dict(device="cuda", dtype=torch.bfloat16)
    qkv = torch.randn(1, S, 3 * H * D, **cuda)
    q = qkv.unflatten(-1, (3, H, D))[:, :, 0]  # the view the fused QKV projection gives
    q_contiguous = q.contiguous()
    head_weight, weight = torch.randn(H, D, **cuda), torch.randn(H * D, **cuda)

    def per_head(x, w):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + EPS) * w).to(x.dtype)

    compiled = torch.compile(per_head)

    cases = {
        "rms_norm over D, strided view": lambda: F.rms_norm(q, (D,), eps=EPS),
        "rms_norm over D, contiguous": lambda: F.rms_norm(q_contiguous, (D,), eps=EPS),
        "rms_norm over D, strided, then * weight[H, D] (vidpar eager)": lambda: (
            F.rms_norm(q, (D,), eps=EPS) * head_weight
        ),
        "rms_norm over H*D with weight, contiguous (Wan)": lambda: F.rms_norm(
            q_contiguous.flatten(-2), (H * D,), weight, eps=EPS
        ),
        "* weight[H, D] alone": lambda: q_contiguous * head_weight,
        ".contiguous() of the view": lambda: q.contiguous(),
        "float32 math, eager": lambda: per_head(q, head_weight),
        "float32 math, torch.compile (one kernel)": lambda: compiled(q, head_weight),
        "vidpar.nn.elementwise.head_rms_norm, strided view": lambda: head_rms_norm(
            q, head_weight, EPS
        ),
    }
    for name, fn in cases.items():
        print(f"{name:66s} {microseconds(fn):8.1f} us")


if __name__ == "__main__":
    main()
