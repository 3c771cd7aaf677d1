"""The MLP's up projection on one GPU at the Wan2.1-1.3B sizes (32,760 × 1,536 → 8,960,
bf16): ``addmm`` then tanh-GELU (two kernels) against ``torch._addmm_activation`` (the
GELU in cuBLASLt's epilogue), forward only; median of 50 after 5 warm-ups, and the largest
difference. Run on a GPU: ``python benchmarks/mlp_epilogue.py``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from cuda_timing import median_ms


def main() -> None:
    x = torch.randn(32760, 1536, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(8960, 1536, device="cuda", dtype=torch.bfloat16) * 0.03
    b = torch.randn(8960, device="cuda", dtype=torch.bfloat16) * 0.1
    with torch.no_grad():
        two = median_ms(lambda: F.gelu(F.linear(x, w, b), approximate="tanh"), 50, 5)
        mm = median_ms(lambda: F.linear(x, w, b), 50, 5)
        fused = median_ms(lambda: torch._addmm_activation(b, x, w.t(), use_gelu=True), 50, 5)
        diff = (
            (
                torch._addmm_activation(b, x, w.t(), use_gelu=True).float()
                - F.gelu(F.linear(x, w, b), approximate="tanh").float()
            )
            .abs()
            .max()
        )
    print(
        f"linear {mm:.3f} ms; linear + gelu {two:.3f} ms; addmm_activation {fused:.3f} ms; max diff {diff:.3e}"
    )


if __name__ == "__main__":
    main()
