"""VideoDiT under every layout against the single-device model on the same weights.

Each rank builds the single-device reference inside ``single_process()``, gives it random
weights (the adaLN and final layers start at zero, which would hide most gradients),
loads them into the parallel model with ``load_full_state_dict``, and runs both on the
same inputs and loss. The output is gathered, so it must equal the reference everywhere.

Gradients: tp-sharded parameters are compared with the matching chunk of the reference
gradient. Under sequence parallelism each sp rank only sees its own tokens, so its
gradient of every parameter (replicated, or a tp shard replicated over sp) is its share;
the test sums them over the sp group first, which is what the data/sequence-parallel
gradient reduction (DDP over dp × sp) does in training.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from vidpar.config import ParallelConfig
from vidpar.distributed import state as ps
from vidpar.distributed.full_weights import full_state_dict, shard_sizes, tensor_parallel_shard
from vidpar.nn import DiTConfig, VideoDiT

SIZES = {
    "in_channels": 3,
    "patch_size": (1, 2, 2),
    "hidden_size": 32,
    "num_heads": 4,
    "depth": 2,
    "num_classes": 5,
    "context_dim": 16,
    "context_len": 3,
}


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.copy_(0.2 * torch.randn(p.shape, generator=gen, dtype=torch.float64))


def inputs(frames: int, size: int, cond: str, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(frames * 100 + size)

    def randn(*shape):
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)

    x = randn(2, 3, frames, size, size)
    t = torch.rand(2, generator=gen, dtype=torch.float64).to(dtype)
    # Label 5 is the null class (classifier-free guidance).
    c = torch.tensor([1, 5]) if cond == "class" else randn(2, 4, SIZES["context_dim"])
    return x, t, c, randn(*x.shape)


def dit_errors(
    frames: int,
    size: int,
    cond: str,
    dtype_name: str = "float64",
    recompute: bool | str = False,
    modulation: str = "shared",
    **sizes: int,
) -> dict:
    """Relative errors of the output and of every parameter's gradient on this rank
    (``recompute``: the parallel model under activation checkpointing; ``sizes``: model
    sizes other than :data:`SIZES`)."""
    dtype = getattr(torch, dtype_name)
    classes = SIZES["num_classes"] if cond == "class" else 0
    config = DiTConfig(**{**SIZES, **sizes, "num_classes": classes, "modulation": modulation})
    with ps.single_process():
        ref = VideoDiT(config).to(dtype)
    randomize(ref)
    par_config = DiTConfig(**{**vars(config), "activation_checkpointing": recompute})
    par = VideoDiT.from_full_state_dict(par_config, full_state_dict(ref), dtype=dtype)

    x, t, c, w = inputs(frames, size, cond, dtype)
    out_ref, out_par = ref(x, t, c), par(x, t, c)
    (out_ref * w).sum().backward()
    (out_par * w).sum().backward()

    def rel(a, b):
        return ((a - b).abs().max() / b.abs().max()).item()

    tp, sp = ps.get_tp_group(), ps.get_sp_group()
    ref_params = dict(ref.named_parameters())
    grad_errors = {}
    for name, p in par.named_parameters():
        grad = sp.all_reduce(p.grad.clone())  # the dp × sp gradient reduction
        expect = ref_params[name].grad
        assert expect.abs().max() > 0, f"{name}: reference gradient is zero"
        dim = getattr(p, "tensor_parallel_dim", None)
        if dim is not None:
            expect = tensor_parallel_shard(expect, dim, tp, shard_sizes(p))
        grad_errors[name] = rel(grad, expect)
    return {
        "out": rel(out_par, out_ref),
        "grad": max(grad_errors.values()),
        "params": len(grad_errors),
        "shape_ok": out_par.shape == x.shape,
    }


NUM_PARAMS = len(list(VideoDiT(DiTConfig(**SIZES)).parameters()))

CASES = [
    # id, world size, layout, frames, latent size (tokens = frames × (size/2)²), cond
    ("tp2", 2, ParallelConfig(tp=2), 2, 4, "class"),
    ("ulysses2", 2, ParallelConfig(sp=2), 2, 4, "class"),
    ("ulysses2-uneven", 2, ParallelConfig(sp=2), 3, 6, "text"),
    ("ring2", 2, ParallelConfig(ring=2), 2, 4, "text"),
    ("ring2-uneven", 2, ParallelConfig(ring=2), 3, 6, "class"),
    ("ulysses2xring2-uneven", 4, ParallelConfig(ulysses=2, ring=2), 3, 6, "text"),
    ("ring4-padded-block", 4, ParallelConfig(ring=4), 1, 6, "class"),
    ("tp2xsp2", 4, ParallelConfig(tp=2, sp=2), 2, 4, "class"),
    ("tp2xsp2-uneven", 4, ParallelConfig(tp=2, sp=2), 3, 6, "text"),
    ("tp2xring2-uneven", 4, ParallelConfig(tp=2, ring=2), 3, 6, "class"),
]


@pytest.mark.parametrize(
    ("size", "layout", "frames", "latent", "cond"),
    [pytest.param(*case[1:], id=case[0]) for case in CASES],
)
def test_matches_single_device_model(worlds, size, layout, frames, latent, cond) -> None:
    """float64: output and every gradient to 1e-10 (relative to each tensor's largest
    entry). Uneven cases have 27 tokens (9 over ring 4: a shard of pure padding)."""
    for result in worlds(size).run(dit_errors, frames, latent, cond, layout=layout):
        assert result["shape_ok"] and result["params"] == NUM_PARAMS - (cond == "text")
        assert result["out"] <= 1e-10 and result["grad"] <= 1e-10, result


@pytest.mark.parametrize(
    ("recompute", "layout"),
    [
        pytest.param(True, ParallelConfig(tp=2, ring=2), id="full-tp2xring2"),
        pytest.param("keep_attention", ParallelConfig(tp=2, sp=2), id="keep_attention-tp2xsp2"),
    ],
)
def test_activation_checkpointing_recomputes_the_same_gradients(worlds, recompute, layout):
    """Blocks recomputed in backward (their all-to-alls and ring passes run again, the
    kept attention outputs reused) give the single-device gradients: tp2 × ulysses2 ×
    ring2 would need 8; tp2 × ring2 has both, tp2 × ulysses2 the all-to-alls around the
    kept outputs."""
    for result in worlds(4).run(dit_errors, 3, 6, "class", recompute=recompute, layout=layout):
        assert result["out"] <= 1e-10 and result["grad"] <= 1e-10, result


class _AttentionCalls(TorchDispatchMode):
    """Counts CPU fused attention kernels by whether they attend to ≥ as many keys as
    queries (self-attention) or fewer (cross-attention to the short context)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = {"self": 0, "cross": 0}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default:
            self.calls["self" if args[1].shape[-2] >= args[0].shape[-2] else "cross"] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    ("recompute", "self_calls"), [(False, 1), (True, 2), ("keep_attention", 1)]
)
def test_keep_attention_runs_each_self_attention_once(recompute, self_calls) -> None:
    """Forward and backward: each block's self-attention kernel runs once unless fully
    recomputed; the cheap cross-attention is recomputed under both checkpointings."""
    config = DiTConfig(**{**SIZES, "activation_checkpointing": recompute})
    with ps.single_process():
        model = VideoDiT(config).to(torch.float64)
        randomize(model)
        x, t, c, w = inputs(2, 4, "class", torch.float64)
        with _AttentionCalls() as counted:
            (model(x, t, c) * w).sum().backward()
    cross_calls = 1 if recompute is False else 2
    depth = SIZES["depth"]
    assert counted.calls == {"self": self_calls * depth, "cross": cross_calls * depth}


def test_keep_attention_refuses_ring_attention(worlds) -> None:
    config = DiTConfig(**{**SIZES, "activation_checkpointing": "keep_attention"})
    for message in worlds(2).run(_construction_error, config, layout=ParallelConfig(ring=2)):
        assert "ring" in message


def _construction_error(config: DiTConfig) -> str:
    try:
        VideoDiT(config)
    except ValueError as error:
        return str(error)
    return "built"


def test_per_block_modulation_matches_single_device_model(worlds) -> None:
    layout = ParallelConfig(tp=2, sp=2)
    for result in worlds(4).run(dit_errors, 3, 6, "class", modulation="per_block", layout=layout):
        assert result["out"] <= 1e-10 and result["grad"] <= 1e-10, result


def test_float32_matches_to_1e5(worlds) -> None:
    layout = ParallelConfig(tp=2, ring=2)
    for result in worlds(4).run(dit_errors, 3, 6, "text", "float32", layout=layout):
        assert result["out"] <= 1e-5 and result["grad"] <= 1e-5, result


def test_single_process_model() -> None:
    """No layout: runs as one process; nothing is zero that should not be; null class,
    checkpoints and deep copies behave."""
    result = dit_errors(2, 4, "class")  # parallel == reference trivially, but all grads live
    assert result["out"] == 0.0 and result["grad"] == 0.0 and result["params"] == NUM_PARAMS
    config = DiTConfig(**SIZES)
    torch.manual_seed(3)
    model = VideoDiT(config).double()
    randomize(model, seed=3)
    x, t, _, _ = inputs(2, 4, "class", torch.float64)
    with torch.no_grad():
        out = model(x, t, torch.tensor([1, 2]))
        null = model(x, t, torch.tensor([5, 5]))
        assert out.shape == x.shape and not torch.allclose(out, null)
        assert model(x, t[0], torch.tensor([1, 2])).shape == x.shape  # scalar time
        again = VideoDiT.from_full_state_dict(config, full_state_dict(model), dtype=torch.float64)
        assert torch.equal(again(x, t, torch.tensor([1, 2])), out)
        assert torch.equal(copy.deepcopy(model)(x, t, torch.tensor([1, 2])), out)
    torch.manual_seed(3)
    twin = VideoDiT(config)
    torch.manual_seed(3)
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            twin.state_dict().values(), VideoDiT(config).state_dict().values(), strict=True
        )
    )
    text_only = VideoDiT(DiTConfig(**{**SIZES, "num_classes": 0}))
    with pytest.raises(ValueError, match="num_classes=0"):
        text_only(x.float(), t.float(), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        model(x[:, :, :, :3], t, torch.tensor([1, 2]))


def test_blocks_get_token_major_tokens() -> None:
    """The tokens enter every block contiguous ``[B, N, hidden]`` (not the convolution's
    channel-major view), and leave it so: norms need no copy, residual adds no stride."""
    model = VideoDiT(DiTConfig(**SIZES))
    x, t, _, _ = inputs(2, 4, "class", torch.float32)
    layouts = []
    for block in model.blocks:
        block.register_forward_hook(
            lambda m, args, out: layouts.append((args[0].is_contiguous(), out.is_contiguous()))
        )
    with torch.no_grad():
        model(x, t, torch.tensor([1, 2]))
    assert layouts == [(True, True)] * len(model.blocks)


def bad_heads() -> str:
    try:
        VideoDiT(DiTConfig(**{**SIZES, "num_heads": 2}))
    except ValueError as e:
        return str(e)
    return "no error"


def test_fewer_heads_than_ulysses_times_tp_raise(worlds) -> None:
    for message in worlds(4).run(bad_heads, layout=ParallelConfig(tp=2, sp=2)):
        assert message.startswith("num_heads(2) is fewer than ulysses(2) × tp(2) = 4")


def test_config_checks_head_dim() -> None:
    with pytest.raises(ValueError, match=r"hidden_size\(32\) must be num_heads\(3\)"):
        DiTConfig(hidden_size=32, num_heads=3)
    assert DiTConfig(patch_size=[1, 2, 2]).patch_size == (1, 2, 2)  # lists from Hydra


def test_parallel_state_unused_without_layout() -> None:
    assert not ps.model_parallel_is_initialized()
    assert ps.get_sp_group().world_size == 1


def test_wan_sized_model_has_wans_parameter_count() -> None:
    """Shared modulation, FFN 8960 and 4096-wide text: diffusers' Wan2.1-1.3B, weight for
    weight (both built on the meta device); per-block modulation adds 6h² + 6h a block."""
    from diffusers import WanTransformer3DModel

    from vidpar.benchmarks import dit_compare, models

    config = DiTConfig(**dit_compare.GPU_MODEL)  # the sizes the dit suite compares
    with torch.device("meta"):
        ours = VideoDiT(config)
        per_block = VideoDiT(DiTConfig(**{**vars(config), "modulation": "per_block"}))
        wan = WanTransformer3DModel(**models.GPU_MODEL)

    def count(model: torch.nn.Module) -> int:
        return sum(p.numel() for p in model.parameters())

    assert count(ours) == count(wan) == 1_418_996_800
    h = 1536
    extra = 30 * (6 * h * h + 6 * h) + (2 * h * h + 2 * h) - (6 * h * h + 6 * h) - (30 * 6 + 2) * h
    assert count(per_block) - count(ours) == extra


def test_models_saved_before_shared_modulation_still_load(tmp_path) -> None:
    """An exported file whose DiT config has no ``modulation`` (written before it existed)
    is a per-block model, and its weights load into one."""
    import json

    from safetensors.torch import load_file, save_file

    from vidpar.distributed.full_weights import HPARAMS_KEY, read_hyper_parameters
    from vidpar.pipelines import export_weights, read_model_info

    old = DiTConfig(**SIZES, modulation="per_block")
    model = VideoDiT(old).double()
    randomize(model)
    path = export_weights(model, tmp_path / "new.safetensors", {"class_names": list("abcde")})
    hparams = read_hyper_parameters(path)
    del hparams["dit"]["modulation"], hparams["dit"]["compile"]  # as 0.1.0 wrote them
    old_file = tmp_path / "old.safetensors"
    save_file(load_file(path), old_file, metadata={HPARAMS_KEY: json.dumps(hparams)})

    config, data_info = read_model_info(old_file)
    assert config == old and data_info == {"class_names": list("abcde")}
    loaded = VideoDiT.from_full_state_dict(config, old_file, dtype=torch.float64)
    x, t, _, _ = inputs(2, 4, "class", torch.float64)
    labels = torch.tensor([1, 2])
    with torch.no_grad():
        assert torch.equal(loaded(x, t, labels), model(x, t, labels))
    with pytest.raises(KeyError, match="time_proj"):  # into the new default: refused
        VideoDiT.from_full_state_dict(DiTConfig(**SIZES), old_file)
