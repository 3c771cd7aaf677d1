"""DistributedAttention in every mode against plain single-process attention.

Each rank builds the full inputs from one seed, computes the reference (SDPA over the
whole sequence plus the joint tokens) itself, and then the parallel result for its tp
heads and sp shard. Outputs are gathered to the full sequence; q/k/v gradients come back
full through the sharding op's backward. The joint (text) K/V are replicated over sp, so
each rank's gradient for them holds its own queries' share: they are summed over the sp
group before comparing, as the sequence-parallel gradient reduction does for every
replicated tensor.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vidpar.config import ParallelConfig
from vidpar.distributed import communication_op as comm
from vidpar.distributed import state as ps
from vidpar.distributed import telemetry
from vidpar.distributed.utils import split_sizes
from vidpar.nn import DistributedAttention

HEADS, HEAD_DIM, BATCH = 4, 8, 2


def reference(q, k, v, joint_k, joint_v, weight):
    """Output and gradients of ``sum(weight · attention)`` over all tokens + joint ones,
    with SDPA in the inputs' dtype."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, joint_k, joint_v)]
    rq, rk, rv, rjk, rjv = leaves
    keys, values = torch.cat((rk, rjk), 1), torch.cat((rv, rjv), 1)
    out = F.scaled_dot_product_attention(
        rq.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2)
    ).transpose(1, 2)
    (out * weight).sum().backward()
    return out.detach(), [t.grad for t in leaves]


def attention_errors(
    seq_len: int, joint_len: int, dtype: torch.dtype = torch.float64, heads: int = HEADS
) -> tuple[float, float]:
    """Largest relative error of the parallel output and gradients on this rank against
    float64 attention of the same (``dtype``-rounded) inputs, and that of one SDPA in
    ``dtype`` (the usual tolerance). tp splits ``heads`` whole, the first ranks one more."""
    num_heads = heads
    tp, sp = ps.get_tp_group(), ps.get_sp_group()  # groups of one without a layout
    gen = torch.Generator().manual_seed(7 * seq_len + joint_len)

    def randn(*shape):
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)

    q, k, v, weight = (randn(BATCH, seq_len, num_heads, HEAD_DIM) for _ in range(4))
    joint_k, joint_v = (randn(BATCH, joint_len, num_heads, HEAD_DIM) for _ in range(2))
    inputs = (q, k, v, joint_k, joint_v, weight)
    exact_out, exact_grads = reference(*(t.double() for t in inputs))
    usual_out, usual_grads = reference(*inputs)

    sizes = split_sizes(num_heads, tp.world_size)
    start = sum(sizes[: tp.rank_in_group])
    heads = slice(start, start + sizes[tp.rank_in_group])
    leaves = [t[:, :, heads].detach().clone().requires_grad_() for t in (q, k, v, joint_k, joint_v)]
    lq, lk, lv, ljk, ljv = leaves
    local = [comm.shard_sequence(t, sp, dim=1) for t in (lq, lk, lv)]
    joint = {"joint_k": ljk, "joint_v": ljv} if joint_len else {}
    out = DistributedAttention(num_heads)(*local, seq_len=seq_len, **joint)
    full = comm.gather_sequence(out, sp, seq_len, dim=1)
    (full * weight[:, :, heads]).sum().backward()
    grads = [t.grad for t in leaves]
    if joint_len:
        grads[3:] = [sp.all_reduce(g.clone()) for g in grads[3:]]  # the sp gradient reduction
    else:
        grads, exact_grads, usual_grads = grads[:3], exact_grads[:3], usual_grads[:3]

    def worst(out, grads):
        pairs = zip([out, *grads], [exact_out, *exact_grads], strict=True)
        return max(((a.double() - b).abs().max() / b.abs().max()).item() for a, b in pairs)

    usual = [t[:, :, heads] for t in (usual_out, *usual_grads)]
    exact_out, exact_grads = exact_out[:, :, heads], [g[:, :, heads] for g in exact_grads]
    return worst(full, grads), worst(usual[0], usual[1:])


CASES = [(16, 0), (16, 3), (13, 0), (13, 3), (5, 2)]


def all_cases() -> list[tuple[float, float]]:
    low = [attention_errors(13, 3, dtype) for dtype in (torch.float32, torch.bfloat16)]
    return [attention_errors(s, j) for s, j in CASES] + low


LAYOUTS = [
    pytest.param(2, ParallelConfig(tp=2), id="tp2"),
    pytest.param(2, ParallelConfig(sp=2), id="ulysses2"),
    pytest.param(2, ParallelConfig(ring=2), id="ring2"),
    pytest.param(4, ParallelConfig(ulysses=2, ring=2), id="ulysses2xring2"),
    pytest.param(4, ParallelConfig(ring=4), id="ring4"),
    pytest.param(4, ParallelConfig(sp=4), id="ulysses4"),
    pytest.param(4, ParallelConfig(tp=2, sp=2), id="tp2xulysses2"),
    pytest.param(4, ParallelConfig(tp=2, ring=2), id="tp2xring2"),
]


@pytest.mark.parametrize(("size", "layout"), LAYOUTS)
def test_matches_single_process_attention(worlds, size: int, layout: ParallelConfig) -> None:
    """Even and uneven lengths (seq 5 over ring 4 leaves a block of pure padding), with
    and without joint tokens, against float64 attention: float64 to 1e-10, float32 to
    1e-5, bf16 within three times one bf16 SDPA's error (relative; gradients too)."""
    for rank_errors in worlds(size).run(all_cases, layout=layout):
        *exact, (single, _), (half, usual_half) = rank_errors
        assert max(err for err, _ in exact) <= 1e-10, rank_errors
        assert single <= 1e-5, rank_errors
        assert half <= 3 * usual_half, rank_errors


def test_single_process_is_plain_sdpa() -> None:
    """No layout: sp = 1, the layer is SDPA (padded keys past seq_len ignored)."""
    assert attention_errors(9, 0)[0] <= 1e-12
    assert attention_errors(9, 4)[0] <= 1e-12
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 6, 2, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    out = DistributedAttention()(q, k, v, seq_len=4)
    expect = F.scaled_dot_product_attention(
        *(t[:, :4].transpose(1, 2) for t in (q, k, v))
    ).transpose(1, 2)
    assert torch.allclose(out[:, :4], expect, atol=1e-12, rtol=0)
    assert torch.equal(out[:, 4:], torch.zeros_like(out[:, 4:]))


def recorded_ops() -> list[tuple[str, str]]:
    sp = ps.get_sp_group()
    x = torch.randn(1, 4, HEADS // ps.get_tp_group().world_size, HEAD_DIM, requires_grad=True)
    recorder = telemetry.start_recording()
    try:
        DistributedAttention(HEADS)(x, x, x, seq_len=4 * sp.world_size).sum().backward()
    finally:
        telemetry.stop_recording()
    return sorted({(r.group, r.op) for r in recorder.records})


@pytest.mark.parametrize(
    ("size", "layout", "expected"),
    [
        (2, ParallelConfig(tp=2), []),
        (2, ParallelConfig(sp=2), [("ulysses", "all_to_all")]),
        (2, ParallelConfig(ring=2), [("ring", "send_recv")]),
    ],
    ids=["tp2-none", "ulysses2", "ring2"],
)
def test_communication_per_mode(worlds, size: int, layout: ParallelConfig, expected) -> None:
    """sp = 1 communicates nothing; Ulysses only all-to-alls; Ring only sends around."""
    for ops in worlds(size).run(recorded_ops, layout=layout):
        assert ops == expected


def bad_heads() -> list[str]:
    messages = []
    try:  # heads are checked once, where a model meets the layout
        ps.get_parallel_state().check_heads(3)
    except ValueError as e:
        messages.append(str(e))
    x = torch.randn(1, 2, 1, 4)
    try:
        DistributedAttention()(x, x, x)
    except ValueError as e:
        messages.append(str(e))
    return messages


def test_fewer_heads_than_ulysses_times_tp_raise(worlds) -> None:
    for construct, call in worlds(4).run(bad_heads, layout=ParallelConfig(tp=2, sp=2)):
        assert "num_heads(3) is fewer than" in construct and "ulysses(2) × tp(2) = 4" in construct
        assert "1 heads per tp rank" in call and "ulysses(2)" in call


def test_seq_len_is_checked() -> None:
    x = torch.randn(1, 4, 2, 4)
    with pytest.raises(ValueError, match=r"seq_len\(5\)"):
        DistributedAttention()(x, x, x, seq_len=5)


def ring_under_autocast() -> float:
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 4, 2, 8, generator=gen) for _ in range(3))
    plain = DistributedAttention()(q, k, v)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = DistributedAttention()(q, k, v)
    assert mixed.dtype == torch.float32
    return (mixed - plain).abs().max().item()


def test_ring_math_stays_float32_under_autocast(worlds) -> None:
    """The ring's block softmax and log-sum-exp merge must not drop to bf16."""
    assert worlds(2).run(ring_under_autocast, layout=ParallelConfig(ring=2)) == [0.0, 0.0]


def test_ring_sends_adjacent_k_and_v_without_a_copy() -> None:
    """After the Ulysses all-to-all, V follows K in one buffer: the ring sends a view."""
    from vidpar.nn.ring_attention import _stack_kv

    _, k, v = torch.randn(3, 1, 4, 2, 8).unbind(0)
    kv = _stack_kv(k, v)
    assert kv.data_ptr() == k.data_ptr() and torch.equal(kv, torch.stack((k, v)))
    k, v = torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8)
    kv = _stack_kv(k, v)
    assert kv.data_ptr() != k.data_ptr() and torch.equal(kv, torch.stack((k, v)))
