"""The ring's block kernels (vidpar.nn.attention_kernels) against float64 attention.

CPU: the CPU flash kernel's output, log-sum-exp and ring-style gradients (each key block's
backward given the final output and lse), the exact chunked math path and its memory
bound, the float32 merge, the backend cache and its fallback, and the CUDA backends'
calls on meta tensors (argument names and lse shapes as the running torch declares them).
GPU (marked ``gpu``): every CUDA backend forced, the cache's choice, and the ring on one
GPU through LocalRing, all against float64; each backend that takes a key score bias, in
bf16, against SDPA's masked math path in float32.
"""

from __future__ import annotations

import contextlib
import logging

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode

from vidpar.nn import attention_kernels as ak
from vidpar.nn.ring_attention import ring_attention
from vidpar.nn.softmax_merge import SoftmaxMerge, merge_into
from vidpar.nn.testing import LocalRing

SCALE = 0.3


def make(*shape, dtype=torch.float64, device="cpu", seed=0):
    """A ``[B, H, S, D]`` view of ``[B, S, H, D]`` memory, as the ring passes them."""
    gen = torch.Generator().manual_seed(seed)
    b, h, s, d = shape
    x = torch.randn(b, s, h, d, generator=gen, dtype=torch.float64)
    return x.to(device=device, dtype=dtype).transpose(1, 2)


def exact(q, k, v):
    """float64 output and lse of the whole attention."""
    scores = torch.matmul(q.double(), k.double().transpose(-2, -1)) * SCALE
    return torch.softmax(scores, -1) @ v.double(), torch.logsumexp(scores, -1)


def exact_grads(q, k, v, dout):
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out, _ = exact(*leaves)
    out.backward(dout.double())
    return [t.grad for t in leaves]


def rel(a, b) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def blockwise(q, k, v, dout, cut: int):
    """Forward over two key blocks merged by lse, then each block's backward given the
    final output and lse: the ring's scheme on one device."""
    merge = SoftmaxMerge()
    merge.add(*ak.attention_forward(q, k[:, :, :cut], v[:, :, :cut], SCALE))
    merge.add(*ak.attention_forward(q, k[:, :, cut:], v[:, :, cut:], SCALE))
    out, lse = merge.result()
    first = ak.attention_backward(dout, q, k[:, :, :cut], v[:, :, :cut], out, lse, SCALE)
    second = ak.attention_backward(dout, q, k[:, :, cut:], v[:, :, cut:], out, lse, SCALE)
    dq = first[0].double() + second[0].double()
    dk, dv = (torch.cat((a, b), 2) for a, b in zip(first[1:], second[1:], strict=True))
    return out, lse, [dq, dk, dv]


def errors(dtype, device, backend, q_len=100, k_len=70, head_dim=64):
    """Largest relative error of the blockwise out, lse and grads against float64, and
    the same for one SDPA in ``dtype`` (the usual tolerance)."""
    q = make(2, 3, q_len, head_dim, dtype=dtype, device=device, seed=1)
    k = make(2, 3, k_len, head_dim, dtype=dtype, device=device, seed=2)
    v = make(2, 3, k_len, head_dim, dtype=dtype, device=device, seed=3)
    dout = make(2, 3, q_len, head_dim, dtype=dtype, device=device, seed=4)
    ref_out, ref_lse = exact(q, k, v)
    ref_grads = exact_grads(q, k, v, dout)
    with ak.use_backend(backend):
        out, lse, grads = blockwise(q, k, v, dout, cut=k_len // 3)
    assert out.dtype == dtype and out.shape == q.shape
    assert lse.shape == q.shape[:3] and lse.dtype == ak._accumulate_dtype(dtype)
    got = [rel(out, ref_out), rel(lse, ref_lse)] + [
        rel(g, r) for g, r in zip(grads, ref_grads, strict=True)
    ]
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    sdpa = F.scaled_dot_product_attention(*leaves, scale=SCALE)
    sdpa.backward(dout)
    usual = [rel(sdpa, ref_out)] + [rel(t.grad, r) for t, r in zip(leaves, ref_grads, strict=True)]
    return got, usual


# CPU ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpu_flash_matches_float64(dtype):
    got, usual = errors(dtype, "cpu", "cpu_flash", head_dim=16)
    assert max(got[1:2]) <= 1e-5, got  # lse is float32 in every dtype
    assert max(got) <= 2 * max(usual) + 1e-6, (got, usual)


def test_math_path_is_exact():
    got, _ = errors(torch.float64, "cpu", "math", head_dim=16)
    assert max(got) <= 1e-12, got


def test_float64_dispatches_to_math_and_low_precision_to_the_cpu_kernel():
    ak.clear_choices()
    for dtype in (torch.float64, torch.float32):
        q = make(1, 2, 5, 8, dtype=dtype)
        ak.attention_forward(q, q, q, SCALE)
    assert sorted(ak.chosen_backends().values()) == ["cpu_flash", "math"]


class _LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any op returns (other than those
    written in place: results sharing a storage with ``in_place``)."""

    def __init__(self, *in_place: torch.Tensor) -> None:
        super().__init__()
        self.largest = 0
        self.in_place = {t.untyped_storage().data_ptr() for t in in_place}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for t in result if isinstance(result, tuple | list) else [result]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.in_place:
                self.largest = max(self.largest, t.numel())
        return result


def test_math_path_never_holds_the_whole_score_matrix(monkeypatch):
    """With a budget of 4,096 scores, 2 × 2 heads × 96 queries × 80 keys (30,720 scores)
    run in chunks (queries and keys both split) and stay exact; no op returns more than
    the budget or an input-sized tensor."""
    monkeypatch.setattr(ak, "MATH_CHUNK_ELEMENTS", 4096)
    assert ak.math_chunks(4, 96, 80) == (64, 16)
    assert ak.math_chunks(4, 10, 80) == (10, 80)
    assert ak.math_chunks(4, 96, 8) == (96, 8)
    q, k, v, dout = (make(2, 2, n, 4, seed=s) for s, n in enumerate((96, 80, 80, 96)))
    ref_out, ref_lse = exact(q, k, v)
    ref_grads = exact_grads(q, k, v, dout)
    with _LargestTensor() as seen:
        out, lse = ak.attention_forward(q, k, v, SCALE)
        grads = ak.attention_backward(dout, q, k, v, out, lse, SCALE)
    assert seen.largest <= 4096
    assert rel(out, ref_out) <= 1e-12 and rel(lse, ref_lse) <= 1e-12
    assert max(rel(g, r) for g, r in zip(grads, ref_grads, strict=True)) <= 1e-12


def test_math_chunks_at_full_size():
    """32,760 tokens × 12 heads: chunks of at most MATH_CHUNK_ELEMENTS scores."""
    for q_len, k_len in ((32760, 32760), (16380, 32760), (8190, 8190), (7, 300000)):
        q_step, k_step = ak.math_chunks(12, q_len, k_len)
        assert 12 * q_step * k_step <= ak.MATH_CHUNK_ELEMENTS
        assert 1 <= q_step <= q_len and 1 <= k_step <= k_len
        assert q_step >= min(q_len, 64)


def test_merge_accumulates_in_the_first_block_in_float32():
    """Three bf16 blocks merged: weights and sums in float32, each merge stored once in
    bf16 in the first block's buffer, so the result stays within a few bf16 roundings of
    float64; an empty merge has no result."""
    q = make(1, 2, 33, 8, dtype=torch.bfloat16, seed=5)
    k, v = (make(1, 2, 60, 8, dtype=torch.bfloat16, seed=s) for s in (6, 7))
    ref_out, ref_lse = exact(q, k, v)
    merge = SoftmaxMerge()
    with pytest.raises(ValueError, match="no block"):
        merge.result()
    with ak.use_backend("math"):  # float32 blocks, rounded to bf16 like a kernel's
        parts = [
            ak.attention_forward(q, k[:, :, i : i + 20], v[:, :, i : i + 20], SCALE)
            for i in (0, 20, 40)
        ]
    for part in parts:
        merge.add(*part)
    out, lse = merge.result()
    assert out.data_ptr() == parts[0][0].data_ptr() and out.dtype == torch.bfloat16
    assert lse.dtype == torch.float32 and rel(lse, ref_lse) <= 1e-6
    assert rel(out, ref_out) <= 3 * 2**-8


def test_float32_merge_allocates_nothing_output_sized():
    """A float32 merge runs in place: no op returns a tensor as large as the output."""
    acc, out = (make(1, 2, 64, 8, dtype=torch.float32, seed=s) for s in (8, 9))
    lse_a, lse_b = torch.randn(1, 2, 64), torch.randn(1, 2, 64)
    expect = (acc.double() * (lse_a - torch.logaddexp(lse_a, lse_b)).exp().unsqueeze(-1)) + (
        out.double() * (lse_b - torch.logaddexp(lse_a, lse_b)).exp().unsqueeze(-1)
    )
    with _LargestTensor(acc) as seen:
        lse = merge_into(acc, lse_a, out, lse_b)
    assert seen.largest < acc.numel()
    assert rel(acc, expect) <= 1e-6 and rel(lse, torch.logaddexp(lse_a, lse_b)) <= 1e-6


def test_cache_falls_back_once_and_logs(monkeypatch, caplog):
    """A backend that fails is skipped, the one that ran is cached and logged once, and
    the failing one is not tried again for that key."""
    calls = []

    def broken(*args):
        calls.append(1)
        raise RuntimeError("no kernel for this")

    monkeypatch.setitem(ak._FORWARD, "cpu_flash", broken)
    ak.clear_choices()
    q = make(1, 2, 6, 8, dtype=torch.float32)
    with caplog.at_level(logging.INFO, logger=ak.__name__):
        for _ in range(3):
            out, _ = ak.attention_forward(q, q, q, SCALE)
    assert calls == [1]
    assert list(ak.chosen_backends().values()) == ["math"]
    assert [r.getMessage() for r in caplog.records] == [
        "attention kernels: forward cpu float32 d8 (aligned) uses math"
        " (cpu_flash: no kernel for this)"
    ]
    assert rel(out, exact(q, q, q)[0]) <= 1e-6
    with ak.use_backend("cpu_flash"), pytest.raises(RuntimeError, match="no kernel"):
        ak.attention_forward(q, q, q, SCALE)
    with pytest.raises(ValueError, match="unknown attention backend"):
        ak.use_backend("nope").__enter__()


def test_invoke_names_what_the_schema_lacks():
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    q = make(1, 1, 2, 4, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="needs 'value'"):
        ak._invoke(op, query=q, key=q)
    with pytest.raises(RuntimeError, match="takes no \\['window'\\]"):
        ak._invoke(op, query=q, key=q, value=q, window=3)
    out, lse = ak._invoke(op, query=q, key=q, value=q, attn_bias=None)[:2]  # None: ignored
    assert out.shape == q.shape and lse.shape == (1, 1, 2)


@pytest.mark.parametrize("backend", ["cudnn", "flash", "efficient"])
def test_cuda_backends_calls_on_meta_tensors(backend):
    """The CUDA backends' forward and backward, called as on a GPU but on meta tensors:
    the running torch accepts their arguments, and lse comes back as [B, H, S] for a
    length that is not a multiple of 32 (cuDNN's [B, H, S, 1], efficient's padding)."""
    q = make(2, 3, 100, 64, dtype=torch.bfloat16, device="meta")
    k = v = make(2, 3, 70, 64, dtype=torch.bfloat16, device="meta")
    out, lse = ak._FORWARD[backend](q, k, v, SCALE)
    assert out.shape == q.shape and out.dtype == torch.bfloat16
    assert out.transpose(1, 2).is_contiguous()  # [B, S, H, D] memory, like q
    assert lse.shape == (2, 3, 100) and lse.dtype == torch.float32
    dq, dk, dv = ak._BACKWARD[backend](out, q, k, v, out, lse, SCALE)
    assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, v.shape)


def test_local_ring_is_rank_zero_of_a_ring():
    """LocalRing runs the ring's own code: rank 0's output, dQ and every block's dK/dV
    share (handed on around the ring) equal attention over the whole sequence (float64,
    uneven blocks, joint tokens)."""
    b, h, d, block, r = 1, 2, 8, 6, 3
    seq = block * r - 2  # the last block is 4 real tokens + 2 padding
    gen = torch.Generator().manual_seed(9)
    q, dout = (torch.randn(b, block, h, d, generator=gen, dtype=torch.float64) for _ in "ab")
    k, v = (torch.randn(b, block * r, h, d, generator=gen, dtype=torch.float64) for _ in "ab")
    jk, jv = (torch.randn(b, 3, h, d, generator=gen, dtype=torch.float64) for _ in "ab")
    blocks = [torch.stack((k[:, i : i + block], v[:, i : i + block])) for i in range(0, 18, 6)]
    valid = [6, 6, 4]
    ring = LocalRing(blocks, keep_grads=True)
    leaves = [t.clone().requires_grad_() for t in (q, jk, jv)]
    out = ring_attention(
        leaves[0], blocks[0][0], blocks[0][1], ring, valid, leaves[1], leaves[2], SCALE
    )
    out.backward(dout)
    keys, values = torch.cat((k[:, :seq], jk), 1), torch.cat((v[:, :seq], jv), 1)
    heads = [t.transpose(1, 2) for t in (q, keys, values, dout)]
    ref_out, _ = exact(*heads[:3])
    ref_dq, ref_dk, ref_dv = exact_grads(*heads)
    assert rel(out, ref_out.transpose(1, 2)) <= 1e-12
    assert rel(leaves[0].grad, ref_dq.transpose(1, 2)) <= 1e-12
    dk = torch.zeros_like(k)
    dv = torch.zeros_like(v)
    assert len(ring.sent_grads) == r
    for step, grads in enumerate(ring.sent_grads):
        j = -step % r
        dk[:, j * block : (j + 1) * block], dv[:, j * block : (j + 1) * block] = grads
    assert rel(dk[:, :seq], ref_dk.transpose(1, 2)[:, :seq]) <= 1e-12
    assert rel(dv[:, :seq], ref_dv.transpose(1, 2)[:, :seq]) <= 1e-12
    assert rel(leaves[1].grad, ref_dk.transpose(1, 2)[:, seq:]) <= 1e-12
    assert dk[:, seq : block * r].abs().max() == 0  # padding gets no gradient


# GPU --------------------------------------------------------------------------------------


CUDA_CASES = [
    ("cudnn", torch.bfloat16),
    ("cudnn", torch.float16),
    ("flash", torch.bfloat16),
    ("flash", torch.float16),
    ("efficient", torch.bfloat16),
    ("efficient", torch.float32),
]


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("backend", "dtype"), CUDA_CASES, ids=[f"{b}-{str(d)[6:]}" for b, d in CUDA_CASES]
)
@pytest.mark.parametrize("q_len", [100, 256])
def test_cuda_backend_matches_float64(backend, dtype, q_len):
    """Two key blocks merged, then each block's backward with the final output and lse:
    within three times one SDPA's error (same dtype) against float64."""
    got, usual = errors(dtype, "cuda", backend, q_len=q_len, k_len=q_len - 30, head_dim=128)
    assert got[1] <= 1e-4, got  # lse in float32
    assert max(got) <= 3 * max(usual) + 1e-5, (got, usual)


@pytest.mark.gpu
def test_cuda_choice_is_cudnn_and_cached():
    """bf16 at head dim 128 runs on cuDNN (the fastest here), chosen once per pass."""
    ak.clear_choices()
    q = make(1, 4, 256, 128, dtype=torch.bfloat16, device="cuda")
    for _ in range(2):
        out, lse = ak.attention_forward(q, q, q, SCALE)
        ak.attention_backward(out, q, q, q, out, lse, SCALE)
    choices = ak.chosen_backends()
    assert list(choices.values()) == ["cudnn", "cudnn"], choices
    assert all("cuda:0 bfloat16 d128" in key for key in choices), choices


@pytest.mark.gpu
@pytest.mark.parametrize("r", [2, 4])
def test_local_ring_on_gpu_matches_float64(r):
    """One ring rank in bf16 on one GPU (uneven last block, joint tokens): output and dQ
    within three times one bf16 SDPA's error against float64 (the r + 1 partial outputs
    are each rounded to bf16 before the float32 merge)."""
    b, h, d, block = 1, 4, 128, 192
    seq = block * r - 50
    gen = torch.Generator().manual_seed(r)
    q, dout = (torch.randn(b, block, h, d, generator=gen, dtype=torch.float64) for _ in "ab")
    k, v = (torch.randn(b, block * r, h, d, generator=gen, dtype=torch.float64) for _ in "ab")
    jk, jv = (torch.randn(b, 40, h, d, generator=gen, dtype=torch.float64) for _ in "ab")
    bf = [t.to("cuda", torch.bfloat16) for t in (q, k, v, jk, jv, dout)]
    blocks = [
        torch.stack((bf[1][:, i : i + block], bf[2][:, i : i + block]))
        for i in range(0, block * r, block)
    ]
    valid = [block] * (r - 1) + [block - 50]
    qb = bf[0].clone().requires_grad_()
    out = ring_attention(
        qb, blocks[0][0], blocks[0][1], LocalRing(blocks), valid, bf[3], bf[4], SCALE
    )
    out.backward(bf[5])
    exact64 = [t.double() for t in bf]
    keys = torch.cat((exact64[1][:, :seq], exact64[3]), 1)
    values = torch.cat((exact64[2][:, :seq], exact64[4]), 1)
    heads = [t.transpose(1, 2) for t in (exact64[0], keys, values, exact64[5])]
    ref_out, _ = exact(*heads[:3])
    ref_dq = exact_grads(*heads)[0]
    sq = bf[0].transpose(1, 2).detach().requires_grad_()
    sdpa = F.scaled_dot_product_attention(
        sq, *(t.to(torch.bfloat16) for t in heads[1:3]), scale=SCALE
    )
    sdpa.backward(heads[3].to(torch.bfloat16))
    usual_out, usual_dq = rel(sdpa, ref_out), rel(sq.grad, ref_dq)
    assert rel(out.transpose(1, 2), ref_out) <= 3 * usual_out + 1e-5, usual_out
    assert rel(qb.grad.transpose(1, 2), ref_dq) <= 3 * usual_dq + 1e-5, usual_dq


def masked_sdpa(q, k, v, mask, dout, dtype, math: bool):
    """SDPA's output and dq, dk, dv in ``dtype`` with a boolean key mask ``[B, Sk]``
    (``math``: its math path, else whichever kernel SDPA picks)."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    with sdpa_kernel(SDPBackend.MATH) if math else contextlib.nullcontext():
        out = F.scaled_dot_product_attention(*leaves, attn_mask=mask[:, None, None], scale=SCALE)
        out.backward(dout.to(dtype))
    return out, [t.grad for t in leaves]


#: The CUDA backends that bf16 may run on with a key bias (``flash`` takes none).
BIAS_BACKENDS = ("cudnn", "efficient", "math")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BIAS_BACKENDS)
def test_cuda_backend_with_a_key_bias_matches_masked_sdpa(backend):
    """The compiled path's text mask (HunyuanVideo's, Mochi's) as a key bias, in bf16:
    output and dq, dk, dv within three times bf16 SDPA's own error (same mask) against
    SDPA's masked math path in float32, and at most 2 % (bf16 tolerance); lse to 1e-3;
    the left-out keys get exactly no gradient. 70 keys: the bias rows padded to 16."""
    q, dout = (make(2, 4, 100, 128, dtype=torch.bfloat16, device="cuda", seed=s) for s in (1, 4))
    k, v = (make(2, 4, 70, 128, dtype=torch.bfloat16, device="cuda", seed=s) for s in (2, 3))
    mask = torch.ones(2, 70, dtype=torch.bool, device="cuda")
    mask[0, ::5] = False  # scattered keys left out
    mask[1, 37:] = False  # a padded prompt
    bias = ak.key_bias(mask, torch.bfloat16)
    with ak.use_backend(backend):
        out, lse = ak.attention_forward(q, k, v, SCALE, bias)
        grads = ak.attention_backward(dout, q, k, v, out, lse, SCALE, bias)
    ref_out, ref_grads = masked_sdpa(q, k, v, mask, dout, torch.float32, math=True)
    scores = torch.matmul(q.float(), k.float().transpose(-2, -1)) * SCALE
    ref_lse = torch.logsumexp(scores.masked_fill(~mask[:, None, None], -torch.inf), -1)
    usual_out, usual_grads = masked_sdpa(q, k, v, mask, dout, torch.bfloat16, math=False)
    got = [rel(out, ref_out)] + [rel(g, r) for g, r in zip(grads, ref_grads, strict=True)]
    usual = [rel(usual_out, ref_out)] + [
        rel(g, r) for g, r in zip(usual_grads, ref_grads, strict=True)
    ]
    assert out.dtype == torch.bfloat16 and rel(lse, ref_lse) <= 1e-3, rel(lse, ref_lse)
    assert max(got) <= min(3 * max(usual) + 1e-3, 0.02), (got, usual)
    for grad in grads[1:]:  # [B, H, Sk, D]: the left-out keys' rows
        assert not grad.transpose(1, 2)[~mask].any()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_merge_is_one_kernel_in_place(dtype):
    """On CUDA the merge is inductor's kernel: it writes the first block's buffer in
    place and equals the eager formula (float32 arithmetic, one rounding to ``dtype``)."""
    acc = make(1, 12, 1000, 128, dtype=dtype, device="cuda", seed=10)
    out = make(1, 12, 1000, 128, dtype=dtype, device="cuda", seed=11)
    lse_a, lse_b = (torch.randn(1, 12, 1000, device="cuda") for _ in "ab")
    merged = torch.logaddexp(lse_a, lse_b)
    expect = acc.float() * (lse_a - merged).exp().unsqueeze(-1) + out.float() * (
        lse_b - merged
    ).exp().unsqueeze(-1)
    pointer = acc.data_ptr()
    lse = merge_into(acc, lse_a, out, lse_b)
    assert acc.data_ptr() == pointer and acc.dtype == dtype
    assert rel(acc, expect) <= (2**-8 if dtype == torch.bfloat16 else 1e-6)
    assert rel(lse, merged) <= 1e-6
