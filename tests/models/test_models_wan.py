"""vidpar.models.parallelize on diffusers' WanTransformer3DModel: outputs and parameter
gradients equal the unparallelised diffusers model's (float64) under every layout, with
27 tokens (a multiple of neither 2 nor 4); diffusers checkpoints and PEFT LoRA files load
into the tp shards; CFG-parallel sampling; clear errors. Regional compilation:
:func:`compiled_matches_eager`, which tests/nn/test_compile.py runs under each layout in
the same call as VideoDiT's compiled blocks."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch
from diffusers import WanTransformer3DModel
from diffusers.models.normalization import FP32LayerNorm
from safetensors.torch import load_file, save_file

from models_oracle import (
    CFG_LAYOUT,
    LAYOUTS,
    backward_both,
    compare_under_layout,
    gradient_errors,
    relative_error,
    worst,
)
from vidpar.config import ParallelConfig
from vidpar.distributed.full_weights import full_state_dict, load_full_weights
from vidpar.distributed.state import get_parallel_state
from vidpar.models import parallelize, peft_to_adapter
from vidpar.nn.lora import LoraManager
from vidpar.pipelines.flow_matching import FlowMatchEulerSampler, seeded_noise

CONFIG = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 4,
    "attention_head_dim": 8,
    "in_channels": 4,
    "out_channels": 4,
    "text_dim": 16,
    "freq_dim": 32,
    "ffn_dim": 64,
    "num_layers": 2,
    "rope_max_seq_len": 32,
}
#: Latent [B, C, T, H, W] -> 3 × 3 × 3 = 27 tokens.
LATENT = (2, 4, 3, 6, 6)
TOKENS = 27
TEXT = 5
TOLERANCE = 1e-9
#: Gradients that diffusers' Wan itself rounds to float32 while they are partial sums
#: over tokens: the weights of its FP32LayerNorms (``norm2``), the time embedding, which
#: every block reads through ``temb.float()``, and the I2V image embedder, which ends in an
#: FP32LayerNorm. Under sp each rank's share is rounded before the sum over sp, so these
#: agree to float32 precision; under tp alone they meet TOLERANCE.
FLOAT32_EMBEDDERS = ("condition_embedder.time_", "condition_embedder.image_embedder.")
FLOAT32_TOLERANCE = 1e-6

#: Model and input variants (config overrides, input options, gradient checkpointing):
#: Wan2.1 T2V, the same with diffusers' gradient checkpointing (the blocks recompute in
#: the backward), Wan2.2 TI2V (a timestep per token), Wan2.1 I2V (image tokens before 512
#: text tokens, added K/V projections).
VARIANTS = {
    "t2v": ({}, {}, False),
    "checkpointed": ({}, {}, True),
    "ti2v": ({}, {"per_token_timestep": True}, False),
    "i2v": ({"image_dim": 8, "added_kv_proj_dim": 32}, {"image_tokens": 3, "text": 512}, False),
    "3heads": ({"num_attention_heads": 3}, {}, False),  # uneven over ulysses 2
}


def tiny_wan(seed: int = 0, **overrides) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    return WanTransformer3DModel(**{**CONFIG, **overrides}).double()


def wan_inputs(
    seed: int = 1, *, text: int = TEXT, per_token_timestep: bool = False, image_tokens: int = 0
) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    batch = LATENT[0]
    shape = (batch, TOKENS) if per_token_timestep else (batch,)
    inputs = {
        "hidden_states": torch.randn(LATENT, generator=gen, dtype=torch.float64),
        "timestep": torch.rand(shape, generator=gen, dtype=torch.float64) * 1000,
        "encoder_hidden_states": torch.randn(batch, text, 16, generator=gen, dtype=torch.float64),
    }
    if image_tokens:
        image = torch.randn(batch, image_tokens, 8, generator=gen, dtype=torch.float64)
        inputs["encoder_hidden_states_image"] = image
    return inputs


def _matches_diffusers(variant: str) -> dict[str, float]:
    overrides, input_options, checkpointing = VARIANTS[variant]
    reference = tiny_wan(**overrides)
    model = parallelize(copy.deepcopy(reference))
    if checkpointing:
        reference.enable_gradient_checkpointing()
        model.enable_gradient_checkpointing()
    return compare_under_layout(reference, model, wan_inputs(**input_options))


def float32_gradients(model: WanTransformer3DModel) -> set[str]:
    """The parameters whose gradients diffusers computes in float32 (see above)."""
    names = {n for n, _ in model.named_parameters() if n.startswith(FLOAT32_EMBEDDERS)}
    for prefix, module in model.named_modules():
        if isinstance(module, FP32LayerNorm):
            names |= {f"{prefix}.{n}" for n, _ in module.named_parameters()}
    return names


def check_errors(errors: dict[str, float], model: WanTransformer3DModel, sp: int) -> None:
    """Output and gradients within TOLERANCE (float32 ones within FLOAT32_TOLERANCE under sp)."""
    assert errors.pop("output") <= TOLERANCE
    loose = float32_gradients(model) if sp > 1 else set()
    assert loose or sp == 1
    for name, error in errors.items():
        assert error <= (FLOAT32_TOLERANCE if name in loose else TOLERANCE), (name, error)


@pytest.mark.parametrize(
    ("layout", "variant"),
    [(name, "t2v") for name in LAYOUTS]
    + [("ulysses2_ring2", "checkpointed"), ("sp2", "ti2v"), ("tp2_sp2", "i2v")]
    + [("cfg2_sp2", "t2v")],
)
def test_outputs_and_gradients_equal_diffusers(worlds, layout, variant):
    """cfg2_sp2: each cfg rank runs one sample of the batch (a guidance branch)."""
    config = CFG_LAYOUT if layout == "cfg2_sp2" else LAYOUTS[layout]
    errors = worst(worlds(config.world_size).run(_matches_diffusers, variant, layout=config))
    check_errors(errors, tiny_wan(**VARIANTS[variant][0]), config.sp)


def _checkpoint_round_trip(folder: str) -> dict[str, float]:
    """A diffusers folder loads into the shards; the full state dict comes back whole."""
    reference = WanTransformer3DModel.from_pretrained(folder).double()
    model = parallelize(WanTransformer3DModel.from_pretrained(folder).double())
    saved = full_state_dict(model)
    expected = reference.state_dict()
    assert list(saved) == list(expected)
    errors = {name: relative_error(saved[name], expected[name]) for name in expected}
    other = parallelize(tiny_wan(seed=5))  # other weights, then the file's
    load_full_weights(other, f"{folder}/diffusion_pytorch_model.safetensors")
    inputs = wan_inputs()
    errors["output"] = relative_error(
        other(**inputs, return_dict=False)[0], reference(**inputs, return_dict=False)[0]
    )
    return errors


def test_diffusers_checkpoint_loads_and_saves_under_tp2_sp2(worlds, tmp_path):
    torch.manual_seed(0)
    WanTransformer3DModel(**CONFIG).save_pretrained(tmp_path)  # float32, as published
    config = LAYOUTS["tp2_sp2"]
    errors = worst(worlds(4).run(_checkpoint_round_trip, str(tmp_path), layout=config))
    assert max(errors.values()) <= TOLERANCE, errors


LORA_RANK, LORA_ALPHA, LORA_SCALE = 2, 3.0, 0.8
#: Column- and row-parallel, cross-attention on the text, FFN, and a replicated layer.
LORA_TARGETS = [
    "blocks.0.attn1.to_q",
    "blocks.0.attn1.to_out.0",
    "blocks.1.attn2.to_k",
    "blocks.1.ffn.net.0.proj",
    "blocks.1.ffn.net.2",
    "proj_out",
]


def write_peft_lora(path, model: WanTransformer3DModel) -> None:
    """A LoRA file as diffusers writes one for a Wan pipeline: ``transformer.``-prefixed
    PEFT keys, the LoraConfig in the metadata."""
    gen = torch.Generator().manual_seed(3)
    modules = dict(model.named_modules())
    state = {}
    for name in LORA_TARGETS:
        layer = modules[name]
        state[f"transformer.{name}.lora_A.weight"] = torch.randn(
            LORA_RANK, layer.in_features, generator=gen
        )
        state[f"transformer.{name}.lora_B.weight"] = torch.randn(
            layer.out_features, LORA_RANK, generator=gen
        )
    config = {"transformer.r": LORA_RANK, "transformer.lora_alpha": LORA_ALPHA}
    save_file(state, str(path), metadata={"lora_adapter_metadata": json.dumps(config)})


def merged_by_hand(model: WanTransformer3DModel, path) -> WanTransformer3DModel:
    """PEFT's merge: ``W += scale · alpha / r · B @ A``."""
    merged = copy.deepcopy(model)
    state = load_file(str(path))
    modules = dict(merged.named_modules())
    with torch.no_grad():
        for name in LORA_TARGETS:
            a = state[f"transformer.{name}.lora_A.weight"].double()
            b = state[f"transformer.{name}.lora_B.weight"].double()
            modules[name].weight += LORA_SCALE * LORA_ALPHA / LORA_RANK * (b @ a)
    return merged


def _lora_merge_unmerge(path: str) -> dict[str, float]:
    reference = tiny_wan()
    model = parallelize(copy.deepcopy(reference))
    manager = LoraManager(model)
    manager.set_adapter("style", peft_to_adapter(path, scale=LORA_SCALE))
    inputs = wan_inputs()
    with torch.no_grad():
        base = model(**inputs, return_dict=False)[0]
        manager.merge()
        merged = model(**inputs, return_dict=False)[0]
        manager.unmerge()
        restored = model(**inputs, return_dict=False)[0]
        expected = merged_by_hand(reference, path)(**inputs, return_dict=False)[0]
        original = reference(**inputs, return_dict=False)[0]
    return {
        "merged": relative_error(merged, expected),
        "base": relative_error(base, original),
        "restored": float((restored - base).abs().max()),
        "changed": relative_error(merged, original),
    }


def test_peft_lora_merges_and_unmerges_under_tp2(worlds, tmp_path):
    path = tmp_path / "pytorch_lora_weights.safetensors"
    write_peft_lora(path, tiny_wan())
    errors = worst(worlds(2).run(_lora_merge_unmerge, str(path), layout=ParallelConfig(tp=2)))
    assert errors["merged"] <= TOLERANCE and errors["base"] <= TOLERANCE
    assert errors["restored"] == 0.0
    assert errors["changed"] > 1e-3  # the adapter did something


GUIDANCE, STEPS = 5.0, 2


def guided_sample(model: WanTransformer3DModel, batches: list[int]) -> torch.Tensor:
    """Two Euler steps of classifier-free guidance through vidpar's flow-matching sampler
    (diffusers' Wan takes timesteps in [0, 1000])."""

    def velocity(x, t, text):
        batches.append(x.shape[0])
        return model(x, t * 1000, text, return_dict=False)[0]

    inputs = wan_inputs()
    cond = inputs["encoder_hidden_states"]
    noise = seeded_noise(LATENT, seed=11, dtype=torch.float64)
    sampler = FlowMatchEulerSampler(STEPS, shift=3.0)
    return sampler.sample(velocity, noise, cond, torch.zeros_like(cond), GUIDANCE)


def _cfg_parallel_sample() -> tuple[torch.Tensor, list[int], int]:
    batches: list[int] = []
    sample = guided_sample(parallelize(tiny_wan()), batches)
    return sample, batches, get_parallel_state().group("cfg").rank_in_group


@pytest.mark.parametrize("layout", [ParallelConfig(cfg=2), ParallelConfig(cfg=2, sp=2)])
def test_cfg_parallel_sampling_equals_one_process(worlds, layout):
    expected = guided_sample(tiny_wan(), [])
    results = worlds(layout.world_size).run(_cfg_parallel_sample, layout=layout)
    for sample, batches, _ in results:
        assert relative_error(sample, expected) <= TOLERANCE
        assert batches == [LATENT[0]] * STEPS  # one branch per cfg rank, not both
    assert {cfg_rank for *_, cfg_rank in results} == {0, 1}


def compiled_matches_eager(backend: str) -> dict[str, float]:
    """The blocks compiled by ``backend`` (``fullgraph=True``) against diffusers' model:
    output and gradient errors, and dynamo's graph breaks (``graph_breaks``)."""
    from torch._dynamo.utils import counters

    counters.clear()
    reference = tiny_wan()
    options = {"backend": backend, "fullgraph": True}  # a graph break raises
    model = parallelize(copy.deepcopy(reference), compile=options)
    inputs = wan_inputs()
    expected = reference(**inputs, return_dict=False)[0]
    out = model(**inputs, return_dict=False)[0]
    backward_both(expected, out)
    compiled = [type(m).__name__ for m in model.modules() if m._compiled_call_impl is not None]
    assert compiled == ["WanTransformerBlock"] * CONFIG["num_layers"], compiled
    return {
        "output": relative_error(out, expected),
        "graph_breaks": sum(counters["graph_break"].values()),
        **gradient_errors(reference, model),
    }


def _bad_heads_and_twice() -> list[str]:
    messages = []
    for make in (lambda: tiny_wan(num_attention_heads=1), tiny_wan):
        model = make()
        try:
            parallelize(model)
            parallelize(model)
        except (ValueError, RuntimeError) as error:
            messages.append(str(error))
    return messages


def test_clear_errors_for_heads_and_a_second_call(worlds):
    heads, twice = worlds(2).run(_bad_heads_and_twice, layout=LAYOUTS["sp2"])[0]
    assert "num_heads(1) is fewer than ulysses(2) × tp(1)" in heads
    assert "parallelised already" in twice


@pytest.mark.parametrize("layout", ["sp2", "tp2"])
def test_three_heads_over_ulysses2_or_tp2_equal_diffusers(worlds, layout):
    """Ulysses and the plan's tp layers (projections, RMSNorms across heads) split 3 heads
    2 + 1."""
    config = LAYOUTS[layout]
    errors = worst(worlds(2).run(_matches_diffusers, "3heads", layout=config))
    check_errors(errors, tiny_wan(num_attention_heads=3), config.sp)


def test_outside_a_layout_the_model_is_left_as_it_is():
    model = tiny_wan()
    processors = [type(b.attn1.processor) for b in model.blocks]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert parallelize(model) is model
    assert [type(b.attn1.processor) for b in model.blocks] == processors
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_an_unknown_model_class_is_named_with_the_known_ones():
    with pytest.raises(TypeError, match=r"torch\.nn\.modules\.linear\.Linear.*WanTransformer3D"):
        parallelize(torch.nn.Linear(2, 2))


def test_import_vidpar_models_does_not_import_diffusers():
    code = "import sys, vidpar, vidpar.models; print('diffusers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_peft_to_adapter_reads_kohya_names_alphas_and_conv_factors(tmp_path):
    a, b = torch.randn(2, 8), torch.randn(6, 2)
    conv_a, conv_b = torch.randn(2, 4, 1, 2, 2), torch.randn(32, 2, 1, 1, 1)
    state = {
        "diffusion_model.blocks.0.attn1.to_q.lora_down.weight": a,
        "diffusion_model.blocks.0.attn1.to_q.lora_up.weight": b,
        "diffusion_model.blocks.0.attn1.to_q.alpha": torch.tensor(4.0),
        "diffusion_model.patch_embedding.lora_down.weight": conv_a,
        "diffusion_model.patch_embedding.lora_up.weight": conv_b,
    }
    adapter = peft_to_adapter(state, scale=0.5)
    assert float(adapter["scale"]) == 0.5
    assert torch.equal(adapter["blocks.0.attn1.to_q.weight.lora_A"], a)
    assert torch.allclose(adapter["blocks.0.attn1.to_q.weight.lora_B"], b.double() * 2.0)
    assert adapter["patch_embedding.weight.lora_A"].shape == (2, 16)
    assert adapter["patch_embedding.weight.lora_B"].shape == (32, 2)

    path = tmp_path / "rslora.safetensors"
    metadata = {"transformer.lora_alpha": 8, "transformer.r": 4, "transformer.use_rslora": True}
    save_file(
        {"transformer.proj_out.lora_A.weight": a, "transformer.proj_out.lora_B.weight": b},
        str(path),
        metadata={"lora_adapter_metadata": json.dumps(metadata)},
    )
    rslora = peft_to_adapter(path)  # alpha / √r with the file's own rank, 2
    assert torch.allclose(rslora["proj_out.weight.lora_B"], b.double() * 8 / 2**0.5)

    with pytest.raises(ValueError, match=r"blocks\.0\.ffn\.net\.2\.diff"):
        peft_to_adapter({**state, "diffusion_model.blocks.0.ffn.net.2.diff": b})
