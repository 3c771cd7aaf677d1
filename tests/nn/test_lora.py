"""LoRA adapters on a tp-sharded VideoDiT: merged weights equal the single-device model
with ``scale · B @ A`` added to its full weights, unmerging is exact, bad adapters fail
clearly (and change nothing). In a gloo world of 2 and through the Executor's RPCs."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from vidpar.config import ParallelConfig
from vidpar.distributed import single_process
from vidpar.distributed.full_weights import full_state_dict
from vidpar.executor import Executor, RemoteError, Worker
from vidpar.nn import DiTConfig, VideoDiT
from vidpar.nn.lora import LoraManager, extract_adapter, save_adapter, shard_delta
from vidpar.pipelines import export_weights, read_model_info
from vidpar.pipelines.generator_worker import GeneratorWorker

CONFIG = DiTConfig(
    in_channels=3,
    hidden_size=32,
    num_heads=4,
    depth=1,
    num_classes=4,
    context_dim=16,
    context_len=2,
)
#: Fused QKV (tp dim 1 of [3, heads·dim, in]), row-parallel, column-parallel, replicated
#: linear, replicated conv (in = c·kt·kh·kw).
TARGETS = [
    "blocks.0.cross_attn.to_k.weight",
    "blocks.0.mlp.fc1.weight",
    "blocks.0.mlp.fc2.weight",
    "blocks.0.self_attn.proj.weight",
    "blocks.0.self_attn.qkv.weight",
    "patch_embed.weight",
    "time_proj.1.weight",
]
SCALE = 0.7


def reference(seed: int = 0) -> VideoDiT:
    """The single-device float64 model with random (all non-zero) weights."""
    with single_process():
        model = VideoDiT(CONFIG).double()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.copy_(0.2 * torch.randn(p.shape, generator=gen, dtype=torch.float64))
    return model


def full_shape_out_in(shape: torch.Size) -> tuple[int, int]:
    """``(out, in)`` of a full weight: the QKV folds its first two dims into out."""
    k = 2 if len(shape) == 3 else 1
    return math.prod(shape[:k]), math.prod(shape[k:])


def make_adapter(model: VideoDiT, rank: int = 3, seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    adapter = {"scale": torch.tensor(SCALE, dtype=torch.float64)}
    for name in TARGETS:
        out, inp = full_shape_out_in(params[name].shape)
        adapter[f"{name}.lora_A"] = torch.randn(rank, inp, generator=gen, dtype=torch.float64)
        adapter[f"{name}.lora_B"] = torch.randn(out, rank, generator=gen, dtype=torch.float64)
    return adapter


def merged_reference(model: VideoDiT, adapter: dict[str, torch.Tensor]) -> VideoDiT:
    """A copy of the single-device model with ``scale · B @ A`` added to full weights."""
    merged = copy.deepcopy(model)
    params = dict(merged.named_parameters())
    with torch.no_grad():
        for name in TARGETS:
            delta = adapter[f"{name}.lora_B"] @ adapter[f"{name}.lora_A"]
            params[name].add_(SCALE * delta.reshape(params[name].shape))
    return merged


def inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 2, 4, 4, generator=gen, dtype=torch.float64)
    return x, torch.tensor([0.3, 0.8], dtype=torch.float64), torch.tensor([1, 4])


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


# In a gloo world of 2, layout tp2 --------------------------------------------------------


def lora_on_sharded_model(export_path: str) -> dict:
    """Runs on every rank: merge, compare with the reference, export the merged model,
    unmerge, compare bits."""
    ref = reference()
    adapter = make_adapter(ref)
    par = VideoDiT.from_full_state_dict(CONFIG, full_state_dict(ref), dtype=torch.float64)
    base = {k: v.clone() for k, v in par.state_dict().items()}
    x, t, c = inputs()
    with torch.no_grad():
        base_out = par(x, t, c)
        manager = LoraManager(par)
        targets = manager.set_adapter("style", adapter)
        assert manager.merge() == "style"
        out = par(x, t, c)
    expected = merged_reference(ref, adapter)
    with torch.no_grad():
        expected_out = expected(x, t, c)
    merged_state, expected_state = full_state_dict(par), expected.state_dict()
    state = {k: v.clone() for k, v in par.state_dict().items()}
    export_weights(par, export_path)  # gathers the shards; rank 0 writes
    # A tp-sized (sharded) factor is refused: adapters hold full factors.
    local = dict(par.named_parameters())["blocks.0.mlp.fc1.weight"].shape[0]
    sharded = {
        "blocks.0.mlp.fc1.weight.lora_A": torch.zeros(2, 32, dtype=torch.float64),
        "blocks.0.mlp.fc1.weight.lora_B": torch.zeros(local, 2, dtype=torch.float64),
    }
    try:
        manager.set_adapter("sharded", sharded)
        sharded_error = "no error"
    except ValueError as err:
        sharded_error = str(err)
    assert manager.unmerge() == "style"
    with torch.no_grad():
        restored_out = par(x, t, c)
    return {
        "targets": targets,
        "out": rel(out, expected_out),
        "weights": max(rel(merged_state[k], expected_state[k]) for k in expected_state),
        "changed": rel(base_out, expected_out),
        "all_shards_changed": all(not torch.equal(state[k], base[k]) for k in TARGETS),
        "others_unchanged": all(torch.equal(state[k], base[k]) for k in base if k not in TARGETS),
        "restored": all(torch.equal(v, base[k]) for k, v in par.state_dict().items()),
        "restored_out": torch.equal(restored_out, base_out),
        "sharded_error": sharded_error,
        "qkv_shard": tuple(par.blocks[0].self_attn.qkv.weight.shape),
    }


def test_merge_matches_full_weights_and_unmerge_is_exact_in_tp2(worlds, tmp_path) -> None:
    path = tmp_path / "merged.safetensors"
    results = worlds(2).run(lora_on_sharded_model, str(path), layout=ParallelConfig(tp=2))
    for r in results:
        assert r["targets"] == TARGETS
        assert r["qkv_shard"] == (3, 16, 32)  # really sharded: 2 of 4 heads of dim 8
        assert r["out"] <= 1e-10 and r["weights"] <= 1e-10, r
        assert r["changed"] > 1e-2, r  # the adapter matters, so the comparison can fail
        assert r["all_shards_changed"] and r["others_unchanged"]
        assert r["restored"] and r["restored_out"]
        assert "does not fit the full weight of shape (128, 32)" in r["sharded_error"]
    # The merged model exported from tp2 is the full merged single-device model.
    ref = reference()
    expected = merged_reference(ref, make_adapter(ref)).state_dict()
    exported = load_file(str(path))
    assert exported.keys() == expected.keys()
    assert max(rel(exported[k], v) for k, v in expected.items()) <= 1e-10
    assert read_model_info(path)[0] == CONFIG


# Single process: the delta itself and bad adapters --------------------------------------


def test_shard_delta_without_layout_is_the_full_product() -> None:
    weight = torch.zeros(3, 8, 5, dtype=torch.float64)
    a, b = torch.randn(2, 5, dtype=torch.float64), torch.randn(24, 2, dtype=torch.float64)
    delta = shard_delta(weight, a, b, 0.5)
    assert torch.equal(delta, (0.5 * (b @ a)).reshape(3, 8, 5))
    half = shard_delta(torch.zeros(4, 5, dtype=torch.bfloat16), a, b[:4], 2.0)
    assert half.dtype == torch.float32  # computed wider than bf16 weights


def test_an_extracted_adapter_turns_the_base_into_the_fine_tune(tmp_path) -> None:
    """Changes of rank 2 come back exactly from a rank-2 adapter (through a file); a rank-1
    adapter leaves the best rank-1 error (the second singular value); biases and norms,
    which an adapter cannot change, are left out."""
    base = reference()
    tuned = {k: v.clone() for k, v in base.state_dict().items()}
    gen = torch.Generator().manual_seed(1)
    for name in TARGETS:
        out, inp = full_shape_out_in(tuned[name].shape)
        u, v = (torch.randn(n, 2, generator=gen, dtype=torch.float64) for n in (out, inp))
        tuned[name] += (0.1 * u @ v.T).reshape(tuned[name].shape)
    tuned["blocks.0.mlp.fc1.bias"] += 1.0
    path = save_adapter(
        extract_adapter(base.state_dict(), tuned, rank=2), tmp_path / "a.safetensors"
    )
    manager = LoraManager(base)
    assert manager.set_adapter("tuned", path) == TARGETS
    manager.merge()
    for name, weight in base.state_dict().items():
        expected = tuned[name] if name in TARGETS else reference().state_dict()[name]
        assert torch.allclose(weight, expected, rtol=0, atol=1e-12), name
    manager.unmerge()

    rank1 = extract_adapter(base.state_dict(), tuned, rank=1)
    manager.set_adapter("rank1", rank1)
    manager.merge("rank1")
    for name in TARGETS:
        shape = full_shape_out_in(tuned[name].shape)
        change = (tuned[name] - reference().state_dict()[name]).reshape(shape)
        error = (tuned[name] - base.state_dict()[name]).reshape(shape)
        second = torch.linalg.svdvals(change)[1]
        assert torch.linalg.matrix_norm(error, ord=2).item() == pytest.approx(
            second.item(), rel=1e-9
        )


def test_extracting_an_adapter_from_mismatched_weights_fails_clearly() -> None:
    weights = reference().state_dict()
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        extract_adapter(weights, weights, rank=0)
    with pytest.raises(ValueError, match="do not differ in any matrix"):
        extract_adapter(weights, weights, rank=4)
    with pytest.raises(ValueError, match=r"entries differ: \['patch_embed.bias'\]"):
        extract_adapter(weights, {k: v for k, v in weights.items() if k != "patch_embed.bias"}, 4)


def bad_adapters() -> dict[str, tuple[type[Exception], str]]:
    """name -> (exception, text it must contain)."""
    fc1 = "blocks.0.mlp.fc1.weight"
    a, b = torch.ones(2, 32), torch.ones(128, 2)
    return {
        "unknown weight": (
            {"blocks.9.mlp.fc1.weight.lora_A": a, "blocks.9.mlp.fc1.weight.lora_B": b},
            "targets weights the model does not have: ['blocks.9.mlp.fc1.weight']",
        ),
        "unpaired": ({f"{fc1}.lora_A": a}, f"lora_A without lora_B for ['{fc1}']"),
        "wrong out": (
            {f"{fc1}.lora_A": a, f"{fc1}.lora_B": torch.ones(64, 2)},
            "B @ A is [64, 32], which does not fit the full weight of shape (128, 32)",
        ),
        "ranks differ": (
            {f"{fc1}.lora_A": a, f"{fc1}.lora_B": torch.ones(128, 3)},
            "ranks differ",
        ),
        "peft names": (
            {f"{fc1}.lora_A.weight": a, f"{fc1}.lora_B.weight": b},
            "not '<weight>.lora_A'",
        ),
        "bias": (
            {"blocks.0.mlp.fc1.bias.lora_A": torch.ones(2, 1), "blocks.0.mlp.fc1.bias.lora_B": b},
            "does not fit the full weight of shape (128,)",
        ),
        "scale": ({f"{fc1}.lora_A": a, f"{fc1}.lora_B": b, "scale": torch.ones(2)}, "scale"),
        "integer factor": (
            {f"{fc1}.lora_A": a.long(), f"{fc1}.lora_B": b},
            "lora_A must be a floating-point tensor",
        ),
        "empty": ({"scale": torch.tensor(1.0)}, "no '<weight>.lora_A' entries"),
    }


def test_bad_adapters_fail_clearly_and_change_nothing(tmp_path) -> None:
    model = reference()
    manager = LoraManager(model)
    good = make_adapter(model)
    manager.set_adapter("good", good)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    for case, (adapter, text) in bad_adapters().items():
        with pytest.raises(ValueError) as err:
            manager.set_adapter("good", adapter)
        assert text in str(err.value), (case, str(err.value))
    assert manager.adapters == {"good": good}  # still the one that was set
    with pytest.raises(FileNotFoundError, match="does not exist"):
        manager.set_adapter("x", tmp_path / "missing.safetensors")
    with pytest.raises(KeyError, match="no adapter 'other'"):
        manager.merge("other")
    manager.set_adapter("other", good)
    with pytest.raises(ValueError, match="name the adapter to merge"):
        manager.merge()
    assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items())
    manager.merge("good")
    with pytest.raises(RuntimeError, match="'good' is merged already"):
        manager.merge("other")
    with pytest.raises(RuntimeError, match="unmerge it before replacing it"):
        manager.set_adapter("good", good)
    assert manager.unmerge() == "good" and manager.unmerge() is None
    assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items())
    # A merge that fails halfway (here: a factor corrupted after it was checked) rolls back.
    manager.adapters["good"]["patch_embed.weight.lora_A"] = torch.ones(3, 5)
    with pytest.raises(ValueError, match="does not fit"):
        manager.merge("good")
    assert manager.merged is None
    assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items())


# Through the Executor's RPCs, tp=2 -------------------------------------------------------


def _build_reference_model(worker: Worker) -> VideoDiT:
    ref = reference()
    return VideoDiT.from_full_state_dict(CONFIG, full_state_dict(ref), dtype=torch.float64)


def _shards(worker: Worker) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in worker.model.state_dict().items()}


def test_lora_rpcs_through_the_executor(tmp_path) -> None:
    ref = reference()
    adapter = make_adapter(ref)
    path = tmp_path / "style.safetensors"
    save_file(adapter, str(path))
    x, t, c = inputs()
    with torch.no_grad():
        expected = merged_reference(ref, adapter)(x, t, c)
        base_out = ref(x, t, c)
    with Executor(
        ParallelConfig(tp=2),
        worker_factory=_build_reference_model,
        devices="cpu",
        worker_cls=GeneratorWorker,
    ) as executor:
        assert executor.collective_rpc("set_lora_adapter", "style", str(path)) == [TARGETS] * 2
        before = executor.collective_rpc(_shards)
        assert executor.collective_rpc("merge_lora") == ["style"] * 2
        merged_out = executor.collective_rpc("execute_forward", (x, t, c))
        with pytest.raises(RemoteError, match="lora_A without lora_B") as err:
            executor.collective_rpc("set_lora_adapter", "bad", {TARGETS[0] + ".lora_A": x})
        assert err.value.exc_type == "ValueError" and set(err.value.errors) == {0, 1}
        with pytest.raises(RemoteError, match="merged already"):
            executor.collective_rpc("merge_lora", "style")
        assert executor.collective_rpc("unmerge_lora") == ["style"] * 2
        after = executor.collective_rpc(_shards)
        restored_out = executor.collective_rpc("execute_forward", (x, t, c))
    for rank in range(2):
        assert rel(merged_out[rank], expected) <= 1e-10
        assert rel(base_out, expected) > 1e-2
        assert rel(restored_out[rank], base_out) <= 1e-10
        assert before[rank].keys() == after[rank].keys()
        assert all(torch.equal(v, before[rank][k]) for k, v in after[rank].items())
    assert before[0]["blocks.0.self_attn.qkv.weight"].shape == (3, 16, 32)
