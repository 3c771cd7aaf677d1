"""Head counts that ulysses × tp does not divide: whole heads split unevenly (the first
ranks one more) over tp and over Ulysses, exact against one process in float64.

The model cases reuse :func:`test_dit.dit_errors` (VideoDiT, output and every gradient
against the single-device model); the attention cases :func:`test_attention.attention_errors`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from test_attention import attention_errors
from test_dit import SIZES, dit_errors, inputs, randomize
from vidpar.config import ParallelConfig
from vidpar.distributed import state as ps
from vidpar.distributed import telemetry
from vidpar.distributed.checkpoint import load_sharded, save_sharded
from vidpar.distributed.full_weights import full_state_dict, load_full_weights
from vidpar.nn import DistributedAttention, DiTConfig, VideoDiT
from vidpar.nn.lora import LoraManager

#: 12 heads of 4 channels (Wan2.1-1.3B's head count), one block.
TWELVE = {"hidden_size": 48, "num_heads": 12, "depth": 1}
#: 6 heads of 4 channels, one block, 90 FFN channels (over tp 4: 23, 23, 22, 22).
SIX = {"hidden_size": 24, "num_heads": 6, "depth": 1, "ffn_dim": 90}


@pytest.mark.parametrize(
    ("size", "layout", "sizes"),
    [
        pytest.param(8, ParallelConfig(sp=8), TWELVE, id="12heads-ulysses8"),
        pytest.param(8, ParallelConfig(ulysses=4, tp=2), TWELVE, id="12heads-ulysses4xtp2"),
        pytest.param(4, ParallelConfig(tp=4), SIX, id="6heads-tp4"),
    ],
)
def test_uneven_heads_match_single_device_model(worlds, size, layout, sizes) -> None:
    """Output and every parameter gradient to 1e-10 (relative), text conditioning (cross
    attention split by heads too) and 27 tokens, so the sequence is padded as well."""
    for result in worlds(size).run(dit_errors, 3, 6, "text", **sizes, layout=layout):
        assert result["shape_ok"], result
        assert result["out"] <= 1e-10 and result["grad"] <= 1e-10, result


def uneven_attention_errors(heads: int) -> float:
    """The worst float64 error over even and padded lengths, with and without joint
    tokens, of ``heads`` heads under the current layout."""
    return max(attention_errors(s, j, heads=heads)[0] for s, j in [(16, 3), (13, 0), (5, 2)])


@pytest.mark.parametrize(
    ("size", "layout", "heads"),
    [
        pytest.param(2, ParallelConfig(sp=2), 3, id="3heads-ulysses2"),
        pytest.param(4, ParallelConfig(sp=4), 6, id="6heads-ulysses4"),
        pytest.param(4, ParallelConfig(ulysses=2, ring=2), 3, id="3heads-ulysses2xring2"),
        pytest.param(4, ParallelConfig(tp=2, sp=2), 5, id="5heads-tp2xulysses2"),
    ],
)
def test_uneven_heads_attention(worlds, size, layout, heads) -> None:
    """DistributedAttention alone: 5 heads over tp 2 × ulysses 2 are 2 + 1 and 1 + 1."""
    for error in worlds(size).run(uneven_attention_errors, heads, layout=layout):
        assert error <= 1e-10


def all_to_all_records(heads: int) -> list[tuple[int, int]]:
    """``(nbytes, q's nbytes)`` of every all-to-all of one attention's forward and
    backward with ``heads`` heads."""
    sp = ps.get_sp_group()
    q, k, v = (torch.randn(1, 4, heads, 8, requires_grad=True) for _ in range(3))
    recorder = telemetry.start_recording()
    try:
        DistributedAttention(heads)(q, k, v, seq_len=4 * sp.world_size).sum().backward()
    finally:
        telemetry.stop_recording()
    q_bytes = q.numel() * q.element_size()
    return [(r.nbytes, q_bytes) for r in recorder.records if r.op == "all_to_all"]


@pytest.mark.parametrize("heads", [4, 3], ids=["even", "uneven"])
def test_q_k_v_travel_in_one_all_to_all(worlds, heads: int) -> None:
    """Forward: one all-to-all carries q, k and v (three times q's bytes; 3 heads over
    ulysses 2 travel as 2 + 2), one brings the output back; backward the same two."""
    largest = -(-heads // 2)
    for records in worlds(2).run(all_to_all_records, heads, layout=ParallelConfig(sp=2)):
        assert len(records) == 4, records
        (packed, q_bytes), (out, _) = records[:2]
        assert packed == 3 * q_bytes * 2 * largest // heads, records
        assert out == q_bytes * 2 * largest // heads, records


def six_heads_reference() -> VideoDiT:
    config = DiTConfig(**{**SIZES, **SIX, "num_classes": 0})
    with ps.single_process():
        model = VideoDiT(config).double()
    randomize(model)
    return model


def round_trip_and_lora(tmp: str) -> dict:
    """Under tp 4: load a full file into 6 heads (2, 2, 1, 1 per rank), gather it back;
    merge a LoRA adapter into the uneven shards and compare with the full merge."""
    ref = six_heads_reference()
    path = f"{tmp}/full-{ps.get_parallel_state().rank}.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, path)
    with torch.device("meta"):
        par = VideoDiT(ref.config)
    par = par.to_empty(device="cpu").double()  # the tags survive to_empty
    load_full_weights(par, path)
    back = full_state_dict(par)
    round_trip = back.keys() == ref.state_dict().keys() and all(
        torch.equal(back[k], v) for k, v in ref.state_dict().items()
    )
    qkv = par.blocks[0].self_attn.qkv

    gen = torch.Generator().manual_seed(3)
    targets = {  # name: (out, in) of the full weight
        "blocks.0.self_attn.qkv.weight": (3 * 24, 24),  # tp dim 1 (heads) of [3, 24, 24]
        "blocks.0.self_attn.proj.weight": (24, 24),  # tp dim 1: input heads
        "blocks.0.cross_attn.to_q.weight": (24, 24),  # tp dim 0: output heads
    }
    adapter = {"scale": torch.tensor(0.5, dtype=torch.float64)}
    expected = dict(back)
    for name, (out, inp) in targets.items():
        a = torch.randn(2, inp, generator=gen, dtype=torch.float64)
        b = torch.randn(out, 2, generator=gen, dtype=torch.float64)
        adapter[f"{name}.lora_A"], adapter[f"{name}.lora_B"] = a, b
        expected[name] = back[name] + 0.5 * (b @ a).reshape(back[name].shape)
    manager = LoraManager(par)
    manager.set_adapter("style", adapter)
    manager.merge()
    merged = full_state_dict(par)
    lora_error = max(
        ((merged[k] - v).abs().max() / v.abs().max()).item() for k, v in expected.items()
    )
    manager.unmerge()
    return {
        "round_trip": round_trip,
        "heads": qkv.num_heads_per_rank,
        "qkv_shard": tuple(qkv.weight.shape),
        "sizes": qkv.weight.tensor_parallel_sizes,
        "lora": lora_error,
        "unmerged": all(torch.equal(v, back[k]) for k, v in full_state_dict(par).items()),
    }


def test_uneven_tp_checkpoint_round_trip_and_lora(worlds, tmp_path) -> None:
    results = worlds(4).run(round_trip_and_lora, str(tmp_path), layout=ParallelConfig(tp=4))
    assert [r["heads"] for r in results] == [2, 2, 1, 1]
    assert [r["qkv_shard"] for r in results] == [(3, 8, 24)] * 2 + [(3, 4, 24)] * 2
    for result in results:
        assert result["round_trip"] and result["unmerged"], result
        assert result["sizes"] == (8, 8, 4, 4) and result["lora"] <= 1e-12, result


def _train_step(model: VideoDiT, optimizer: torch.optim.Optimizer, step: int) -> None:
    x, t, c, w = inputs(2, 4, "text", torch.float64)
    optimizer.zero_grad()
    ((model(x, t, c) * w).sum() * (step + 1)).backward()
    optimizer.step()


def _six_heads_in_training() -> tuple[VideoDiT, torch.optim.Optimizer]:
    model = VideoDiT.from_full_state_dict(
        six_heads_reference().config, full_state_dict(six_heads_reference()), dtype=torch.float64
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _train_step(model, optimizer, 0)
    return model, optimizer


def save_then_step(path: str) -> dict[str, torch.Tensor]:
    """Two steps with a sharded save between them; the full weights after them."""
    model, optimizer = _six_heads_in_training()
    save_sharded(Path(path), model, [optimizer], {"step": 1})
    _train_step(model, optimizer, 1)
    return full_state_dict(model)


def load_then_step(path: str) -> dict[str, torch.Tensor]:
    """A model (one step elsewhere) loads the save and takes the second step."""
    model, optimizer = _six_heads_in_training()
    _train_step(model, optimizer, 5)
    assert load_sharded(Path(path), model, [optimizer]) == {"step": 1}
    _train_step(model, optimizer, 1)
    return full_state_dict(model)


@pytest.mark.parametrize(
    ("saved_tp", "loaded_tp"), [(4, 4), (4, 2), (2, 4)], ids=["tp4-tp4", "tp4-tp2", "tp2-tp4"]
)
def test_sharded_checkpoint_of_uneven_heads_resumes_in_any_tp(
    worlds, tmp_path, saved_tp: int, loaded_tp: int
) -> None:
    """6 heads: tp4 holds 2, 2, 1, 1 (ShardedTensors in the DCP checkpoint), tp2 3, 3
    (DTensors). Weights and Adam moments resume: the step after the load equals the
    step after the save (bit for bit in the same layout)."""
    path = str(tmp_path / "ckpt")
    expected = worlds(4).run(save_then_step, path, layout=ParallelConfig(tp=saved_tp))[0]
    for result in worlds(4).run(load_then_step, path, layout=ParallelConfig(tp=loaded_tp)):
        assert result.keys() == expected.keys()
        for name, value in expected.items():
            error = ((result[name] - value).abs().max() / value.abs().max()).item()
            assert error == 0.0 if saved_tp == loaded_tp else error <= 1e-12, (name, error)


def test_only_a_rank_without_a_head_is_refused() -> None:
    ParallelConfig(sp=8).check_heads(12)
    ParallelConfig(ulysses=16).check_heads(24)  # HunyuanVideo
    ParallelConfig(tp=4).check_heads(6)
    with pytest.raises(
        ValueError, match=r"num_heads\(6\) is fewer than ulysses\(4\) × tp\(2\) = 8"
    ):
        ParallelConfig(ulysses=4, tp=2).check_heads(6)


#: diffusers plan families with code that depends on a tp rank's heads: Wan's RMSNorms
#: across heads, LTX's rope over all heads' features, HunyuanVideo's single-stream output
#: gathered over tp, Mochi's per-head rope tables.
PLAN_FAMILIES = ("skyreels_v2", "ltx", "hunyuan_video", "mochi")


def with_heads(family: str, heads: int) -> dict:
    """The tiny config overrides for ``heads`` heads of 8 channels (LTX's text projection
    is as wide as the heads)."""
    return {"num_attention_heads": heads} | (
        {"cross_attention_dim": heads * 8} if family == "ltx" else {}
    )


def plan_family_errors(family: str, heads: int) -> dict[str, float]:
    """A diffusers family with ``heads`` heads under the current layout against one process
    (outputs and every gradient, float64)."""
    import copy

    from models_oracle import compare_under_layout
    from test_models_families import FAMILIES
    from vidpar.models import parallelize

    reference = FAMILIES[family].make(**with_heads(family, heads)).double()
    model = parallelize(copy.deepcopy(reference))
    return compare_under_layout(reference, model, FAMILIES[family].inputs())


def _plan_family_check(family: str, per_rank: list[dict[str, float]]) -> None:
    from test_models_families import FLOAT32_TOLERANCE, TOLERANCE, _float32_gradients

    loose = _float32_gradients(family)
    errors = {name: max(r[name] for r in per_rank) for name in per_rank[0]}
    assert errors.pop("output") <= TOLERANCE
    bad = {n: e for n, e in errors.items() if e > (FLOAT32_TOLERANCE if n in loose else TOLERANCE)}
    assert not bad, bad


@pytest.mark.parametrize("family", PLAN_FAMILIES)
def test_plan_families_split_6_heads_over_tp4(worlds, family) -> None:
    """tp4 holds 2, 2, 1, 1 heads of every projection, norm and rope table."""
    per_rank = worlds(4).run(plan_family_errors, family, 6, layout=ParallelConfig(tp=4))
    _plan_family_check(family, per_rank)


def test_plan_families_split_12_heads_over_ulysses4_tp2(worlds) -> None:
    """12 heads: 6 per tp rank, 2, 2, 1, 1 of those per Ulysses rank; in the one world of
    8, the two families whose attention reads the rank's place among the heads (LTX's
    rope, HunyuanVideo's gathered single-stream output)."""
    layout = ParallelConfig(ulysses=4, tp=2)
    for family in ("ltx", "hunyuan_video"):
        _plan_family_check(family, worlds(8).run(plan_family_errors, family, 12, layout=layout))


def test_a_wan_plan_family_splits_12_heads_over_ulysses8(worlds) -> None:
    """Wan2.1-1.3B's 12 heads over Ulysses 8 (2, 2, 2, 2, 1, 1, 1, 1), the Wan plan's
    processor with its RMSNorms across heads, 27 tokens padded to 32."""
    per_rank = worlds(8).run(plan_family_errors, "skyreels_v2", 12, layout=ParallelConfig(sp=8))
    _plan_family_check("skyreels_v2", per_rank)


def test_uneven_plan_shards_reshard_through_a_checkpoint(worlds, tmp_path) -> None:
    """HunyuanVideo with 6 heads trained under tp4 (2, 2, 1, 1), its DCP checkpoint loaded
    under tp2 (3, 3): the losses equal one process's, the weights the single-device ones."""
    from models_oracle import relative_error
    from test_models_families import (
        FAMILIES,
        FLOAT32_TOLERANCE,
        _load_full_weights,
        _train_and_save,
        train,
    )

    family, heads, path = "hunyuan_video", 6, str(tmp_path / "ckpt")
    reference = FAMILIES[family].make(num_attention_heads=heads).double()
    expected_losses = train(reference, family)
    runs = worlds(4).run(
        _train_and_save, family, path, num_attention_heads=heads, layout=ParallelConfig(tp=4)
    )
    for losses in runs:
        assert max(abs(a - b) / b for a, b in zip(losses, expected_losses, strict=True)) <= 1e-9
    loaded = worlds(2).run(
        _load_full_weights, family, path, num_attention_heads=heads, layout=ParallelConfig(tp=2)
    )[0]
    expected = reference.state_dict()
    assert list(loaded) == list(expected)
    errors = {name: relative_error(loaded[name], expected[name]) for name in expected}
    assert max(errors.values()) <= FLOAT32_TOLERANCE, max(errors.items(), key=lambda e: e[1])
