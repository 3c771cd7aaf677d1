"""vidpar.models.parallelize on the diffusers families beyond Wan and CogVideoX (one
parametrised test per family × layout): outputs and parameter gradients equal the
unparallelised diffusers model's in float64, with 27 video tokens (a multiple of neither
2 nor 4) and, where the family takes one, a text mask with padding."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest
import torch
from diffusers.models.normalization import FP32LayerNorm

from models_oracle import (
    CFG_LAYOUT,
    LAYOUTS,
    backward_both,
    compare_under_layout,
    gradient_errors,
    relative_error,
    worst,
)
from vidpar.models import SUPPORTED_MODELS, parallelize
from vidpar.models import testing as tiny

TOLERANCE = 1e-9
#: Gradients diffusers itself rounds to float32 while they are partial sums over tokens
#: (FP32LayerNorm weights, Wan-like time embeddings, and HunyuanVideo's text path, whose
#: per-head RMSNorms compute in float32 while each sp rank holds a share of the text's
#: gradient, most under Ring), or sums in float32 in another order (Mochi's learned rope
#: frequencies): they agree to float32.
FLOAT32_TOLERANCE = 1e-6
BATCH, TEXT = 2, 5


def _noise(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _text_mask() -> torch.Tensor:
    """The second prompt is 2 tokens shorter: its last 2 text tokens are padding."""
    mask = torch.ones(BATCH, TEXT)
    mask[1, -2:] = 0
    return mask


#: HunyuanVideo's text path: the text refiners, the dual-stream blocks' text layers, and
#: the query and key projections the text shares with the video (their gradients meet the
#: text's float32-rounded ones in the joint attention).
HUNYUAN_TEXT_PATH = (
    r"context_embedder|transformer_blocks\.\d+\.(attn\.(add_|to_add_out|norm_added)|"
    r"norm1_context|ff_context)|(single_)?transformer_blocks\.\d+\.attn\.(to|norm)_[qk]\.|"
    r"cond_type_embed"
)

#: Mochi rotates its queries and keys in float32, even in a float64 model: every gradient
#: upstream of a rope (and its learned frequencies) agrees to float32.
MOCHI_FLOAT32 = r".+"


@dataclass(frozen=True)
class Family:
    make: Callable[..., torch.nn.Module]
    inputs: Callable[[], dict]
    #: Parameters (a name pattern) whose gradients diffusers rounds to float32.
    float32: str | None = None


FAMILIES = {
    "skyreels_v2": Family(
        partial(tiny.tiny_transformer, "SkyReelsV2Transformer3DModel"),
        lambda: {
            "hidden_states": _noise(1, BATCH, 16, 3, 6, 6),
            "timestep": torch.tensor([100.0, 700.0], dtype=torch.float64),
            "encoder_hidden_states": _noise(2, BATCH, TEXT, 32),
        },
        r"condition_embedder\.time_",
    ),
    "ltx": Family(
        partial(tiny.tiny_transformer, "LTXVideoTransformer3DModel"),
        lambda: {
            "hidden_states": _noise(1, BATCH, 27, 8),
            "encoder_hidden_states": _noise(2, BATCH, TEXT, 16),
            "timestep": torch.tensor([100.0, 700.0], dtype=torch.float64),
            "encoder_attention_mask": _text_mask(),
            "num_frames": 3,
            "height": 3,
            "width": 3,
        },
    ),
    "hunyuan_video": Family(
        partial(tiny.tiny_transformer, "HunyuanVideoTransformer3DModel"),
        lambda: {
            "hidden_states": _noise(1, BATCH, 4, 3, 3, 3),
            "timestep": torch.tensor([100.0, 700.0], dtype=torch.float64),
            "encoder_hidden_states": _noise(2, BATCH, TEXT, 16),
            "encoder_attention_mask": _text_mask(),
            "pooled_projections": _noise(3, BATCH, 8),
            "guidance": torch.tensor([3000.0, 5000.0], dtype=torch.float64),
        },
        HUNYUAN_TEXT_PATH,
    ),
    "hunyuan_video_15": Family(
        partial(tiny.tiny_transformer, "HunyuanVideo15Transformer3DModel"),
        lambda: {
            "hidden_states": _noise(1, BATCH, 4, 3, 3, 3),
            "timestep": torch.tensor([100.0, 700.0], dtype=torch.float64),
            "encoder_hidden_states": _noise(2, BATCH, TEXT, 16),
            "encoder_attention_mask": _text_mask(),
            "encoder_hidden_states_2": _noise(3, BATCH, 3, 8),
            "encoder_attention_mask_2": torch.tensor([[1, 1, 1], [1, 0, 0]]),
            "image_embeds": torch.zeros(BATCH, 2, 8, dtype=torch.float64),  # T2V
        },
        HUNYUAN_TEXT_PATH,
    ),
    "mochi": Family(
        partial(tiny.tiny_transformer, "MochiTransformer3DModel"),
        lambda: {
            "hidden_states": _noise(1, BATCH, 4, 3, 6, 6),
            "encoder_hidden_states": _noise(2, BATCH, TEXT, 16),
            "timestep": torch.tensor([100.0, 700.0], dtype=torch.float64),
            "encoder_attention_mask": _text_mask().bool(),
        },
        MOCHI_FLOAT32,
    ),
}


def _matches_diffusers(family: str) -> dict[str, float]:
    reference = FAMILIES[family].make().double()
    model = parallelize(copy.deepcopy(reference))
    return compare_under_layout(reference, model, FAMILIES[family].inputs())


def _float32_gradients(family: str) -> set[str]:
    model = FAMILIES[family].make()
    pattern = FAMILIES[family].float32
    names = {n for n, _ in model.named_parameters() if pattern and re.match(pattern, n)}
    for prefix, module in model.named_modules():
        if isinstance(module, FP32LayerNorm):
            names |= {f"{prefix}.{n}" for n, _ in module.named_parameters()}
    return names


@pytest.mark.parametrize("layout", [*LAYOUTS, "cfg2_sp2"])
@pytest.mark.parametrize("family", FAMILIES)
def test_outputs_and_gradients_equal_diffusers(worlds, family, layout):
    """cfg2_sp2: each cfg rank runs one sample of the batch (a guidance branch)."""
    config = CFG_LAYOUT if layout == "cfg2_sp2" else LAYOUTS[layout]
    errors = worst(worlds(config.world_size).run(_matches_diffusers, family, layout=config))
    assert errors.pop("output") <= TOLERANCE
    loose = _float32_gradients(family)
    bad = {
        name: error
        for name, error in errors.items()
        if error > (FLOAT32_TOLERANCE if name in loose else TOLERANCE)
    }
    assert not bad, bad


def test_every_family_is_listed():
    for name in (
        "SkyReelsV2Transformer3DModel",
        "LTXVideoTransformer3DModel",
        "HunyuanVideoTransformer3DModel",
        "HunyuanVideo15Transformer3DModel",
        "MochiTransformer3DModel",
    ):
        assert name in SUPPORTED_MODELS


STEPS, LR = 2, 1e-2


def _cogvideox_inputs() -> dict:
    from test_models_cogvideox import cogvideox_inputs

    return cogvideox_inputs(tiny.tiny_transformer("CogVideoXTransformer3DModel"))


#: The families trained under tp2 × sp2 and resharded to tp1 here: those above and
#: CogVideoX (its layouts: test_models_cogvideox.py; Wan's training:
#: tests/lightning/test_diffusers_training.py).
TRAINED_HERE = {
    **FAMILIES,
    "cogvideox": Family(
        partial(tiny.tiny_transformer, "CogVideoXTransformer3DModel"), _cogvideox_inputs
    ),
}


def train(model: torch.nn.Module, family: str) -> list[float]:
    """``STEPS`` SGD steps on a flow-matching-like loss (the squared error to a fixed
    target), the gradients summed over sp as the strategy's reduction does; the losses."""
    from vidpar.distributed.state import get_parallel_state

    sp = get_parallel_state().group("sp")
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    losses = []
    for step in range(STEPS):
        out = model(**TRAINED_HERE[family].inputs(), return_dict=False)[0]
        loss = (out - _noise(10 + step, *out.shape)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        for param in model.parameters():
            if param.grad is not None:  # None: a branch the inputs do not use
                param.grad = sp.all_reduce(param.grad)
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


def _train_and_save(family: str, path: str, **config) -> list[float]:
    from vidpar.distributed.checkpoint import save_sharded

    model = parallelize(TRAINED_HERE[family].make(**config).double())
    losses = train(model, family)
    save_sharded(Path(path), model, [], {})
    return losses


def _load_full_weights(family: str, path: str, **config) -> dict[str, torch.Tensor]:
    from vidpar.distributed.checkpoint import load_sharded
    from vidpar.distributed.full_weights import full_state_dict

    model = parallelize(TRAINED_HERE[family].make(seed=3, **config).double())  # then the file's
    load_sharded(Path(path), model, [])
    return full_state_dict(model)


@pytest.mark.parametrize("family", TRAINED_HERE)
def test_training_under_tp2_sp2_equals_one_process_and_reshards_to_tp1(worlds, family, tmp_path):
    reference = TRAINED_HERE[family].make().double()
    expected_losses = train(reference, family)
    layout = LAYOUTS["tp2_sp2"]
    runs = worlds(4).run(_train_and_save, family, str(tmp_path / "ckpt"), layout=layout)
    for losses in runs:
        assert max(abs(a - b) / b for a, b in zip(losses, expected_losses, strict=True)) <= 1e-9
    loaded = worlds(2).run(
        _load_full_weights, family, str(tmp_path / "ckpt"), layout=LAYOUTS["sp2"]
    )[0]
    expected = reference.state_dict()
    assert list(loaded) == list(expected)
    errors = {name: relative_error(loaded[name], expected[name]) for name in expected}
    assert max(errors.values()) <= FLOAT32_TOLERANCE, max(errors.items(), key=lambda e: e[1])


#: ChronoEdit (a Wan-shaped video model): diffusers gives its ``_cp_plan``, vidpar no plan.
CHRONOEDIT = Family(
    partial(tiny.tiny_transformer, "ChronoEditTransformer3DModel"),
    FAMILIES["skyreels_v2"].inputs,
    r"condition_embedder\.time_",
)


def _cp_plan_only_matches_diffusers() -> dict[str, float]:
    reference = CHRONOEDIT.make().double()
    model = parallelize(copy.deepcopy(reference))
    inputs = CHRONOEDIT.inputs()
    expected = reference(**inputs, return_dict=False)[0]
    out = model(**inputs, return_dict=False)[0]
    backward_both(expected, out)
    return {"output": relative_error(out, expected), **gradient_errors(reference, model)}


@pytest.mark.parametrize("layout", ["sp2", "ring2", "ulysses2_ring2"])
def test_a_class_with_only_a_diffusers_cp_plan_runs_sequence_parallel(worlds, layout):
    """ChronoEdit's own processors and diffusers' _cp_plan: 27 tokens over sp, exact."""
    config = LAYOUTS[layout]
    errors = worst(worlds(config.world_size).run(_cp_plan_only_matches_diffusers, layout=config))
    assert errors.pop("output") <= TOLERANCE
    loose = {n for n in errors if re.match(CHRONOEDIT.float32, n)}
    loose |= {n for n in errors if n.startswith("blocks.") and ".norm2." in n}  # FP32LayerNorm
    bad = {n: e for n, e in errors.items() if e > (FLOAT32_TOLERANCE if n in loose else TOLERANCE)}
    assert not bad, bad


def _cp_plan_only_under_tp() -> str:
    from diffusers import ChronoEditTransformer3DModel

    model = CHRONOEDIT.make()
    before = {type(m.processor).__name__ for m in model.modules() if hasattr(m, "processor")}
    with pytest.raises(ValueError) as error:
        parallelize(model)
    assert isinstance(model, ChronoEditTransformer3DModel)
    assert {
        type(m.processor).__name__ for m in model.modules() if hasattr(m, "processor")
    } == before
    return str(error.value)


def test_a_class_with_only_a_diffusers_cp_plan_refuses_tp_saying_sp_works(worlds):
    message = worlds(2).run(_cp_plan_only_under_tp, layout=LAYOUTS["tp2"])[0]
    assert "ChronoEditTransformer3DModel runs from its diffusers _cp_plan alone" in message
    assert "sequence parallelism (ulysses, ring, both)" in message and "parallel.tp=1" in message


def test_a_class_without_any_plan_is_refused_naming_the_families():
    from diffusers import AllegroTransformer3DModel

    allegro = {"num_layers": 1, "num_attention_heads": 2, "attention_head_dim": 8}
    with pytest.raises(TypeError, match=r"AllegroTransformer3DModel \(no vidpar plan.*LTX"):
        parallelize(
            AllegroTransformer3DModel(**allegro, cross_attention_dim=16, caption_channels=16)
        )


@pytest.mark.parametrize(
    ("family", "reason"),
    [
        ("CogVideoXTransformer3DModel", "v-prediction DDPM model"),
        ("ChronoEditTransformer3DModel", "from diffusers' _cp_plan alone"),
    ],
)
def test_the_lightning_module_says_why_it_does_not_train_a_family(tmp_path, family, reason):
    import json

    from vidpar.lightning import DiffusersFlowModule

    (tmp_path / "config.json").write_text(json.dumps({"_class_name": family}))
    with pytest.raises(
        ValueError, match=rf"{family}: DiffusersFlowModule does not train it \(.*{reason}.*LTX"
    ):
        DiffusersFlowModule(str(tmp_path))


#: Latents [B, C, T, H, W] (27 tokens each) and text widths of the newly trained families.
TRAINED = {
    "ltx": ("LTXVideoTransformer3DModel", (8, 3, 3, 3), 16),
    "hunyuan_video": ("HunyuanVideoTransformer3DModel", (4, 3, 3, 3), 16),
    "mochi": ("MochiTransformer3DModel", (4, 3, 6, 6), 16),
    "hunyuan_video_15": ("HunyuanVideo15Transformer3DModel", (4, 3, 3, 3), 16),
}


def module_losses(folder: str, family: str) -> list[float]:
    """Two AdamW steps of ``DiffusersFlowModule``'s own loss on a fixed batch of 2 (half
    of it dropped to the negative prompt; a padded prompt), in float64, the gradients summed over sp as
    the strategy's reduction does; the losses."""
    from vidpar.distributed.state import get_parallel_state
    from vidpar.lightning import DiffusersFlowModule

    module = DiffusersFlowModule(folder, lr=1e-3, cfg_dropout=0.5, timestep_shift=3.0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        module.configure_model()  # parallelize under the layout, if any
    finally:
        torch.set_default_dtype(default)
    optimizer = module.configure_optimizers()
    sp = get_parallel_state().group("sp")
    _, latent, width = TRAINED[family]
    prompts = _noise(21, BATCH, TEXT, width)
    prompts[1, -2:] = 0  # the second prompt is 2 tokens shorter: zero-padded, masked
    batch = {
        "latents": _noise(20, BATCH, *latent),
        "prompt_embeds": prompts,
        "negative_prompt_embeds": _noise(22, BATCH, TEXT, width),
        "index": torch.arange(BATCH),
    }
    losses = []
    for step in range(STEPS):
        loss = module._loss(batch, step)
        optimizer.zero_grad()
        loss.backward()
        for param in module.model.parameters():
            if param.grad is not None:
                param.grad = sp.all_reduce(param.grad)
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


def test_latents_folders_fit_each_trained_family(tmp_path):
    """The latents vidpar-train checks a folder against are those the family's forward
    denoises (HunyuanVideo 1.5: 4 of in_channels 9) with its own text width."""
    from vidpar.data.latents import LatentsDataset
    from vidpar.lightning import DiffusersFlowModule
    from vidpar.models.parallelize import latent_widths
    from vidpar.models.pretrained import read_config

    for family, (name, latent, width) in TRAINED.items():
        channels = {"in_channels": 9} if family == "hunyuan_video_15" else {}
        tiny.tiny_transformer(name, **channels).save_pretrained(tmp_path / family)
        folder = tmp_path / family
        assert latent_widths(read_config(folder)) == (latent[0], width)
        tiny.make_tiny_latents(tmp_path / f"{family}-latents", folder, size=latent[1:])
        dataset = LatentsDataset(tmp_path / f"{family}-latents")
        dataset.check_model(latent[0], width, family)
        assert DiffusersFlowModule(str(folder), video_shape=list(latent)).in_channels == latent[0]


def test_each_trained_family_takes_its_forward_in_bf16():
    """In bf16 (``precision="bf16-true"``) each family's flow forward runs, and the timestep
    goes in the dtype its pipeline passes: HunyuanVideo 1.5's in the latents' (its embedder
    computes in the timestep's dtype), the others' in float32."""
    from vidpar.models.parallelize import PLANS

    timestep_dtypes = {}
    for family, (name, latent, width) in TRAINED.items():
        channels = {"in_channels": 9} if family == "hunyuan_video_15" else {}
        model = tiny.tiny_transformer(name, **channels).to(torch.bfloat16)
        flow = PLANS[name].flow
        x = _noise(30, 1, *latent).to(torch.bfloat16)
        text = _noise(31, 1, TEXT, width).to(torch.bfloat16)
        model.register_forward_pre_hook(
            lambda _, args, kwargs, family=family: timestep_dtypes.update(
                {family: kwargs["timestep"].dtype}
            ),
            with_kwargs=True,
        )
        out = flow(model, x, torch.tensor([0.25]), text)
        assert out.shape == x.shape and out.dtype == torch.bfloat16, family
    assert timestep_dtypes == {
        family: torch.bfloat16 if family == "hunyuan_video_15" else torch.float32
        for family in TRAINED
    }


@pytest.mark.parametrize("family", TRAINED)
def test_the_lightning_module_trains_the_family_under_tp2_sp2(worlds, tmp_path, family):
    """Its forward adapter (LTX's tokens, HunyuanVideo's pooled text and guidance, Mochi's
    inverted time, HunyuanVideo 1.5's text-to-video conditioning) under tp2 × sp2 gives
    one process's losses, in float64."""
    channels = {"in_channels": 9} if family == "hunyuan_video_15" else {}  # T2V: 2 × 4 + 1
    tiny.tiny_transformer(TRAINED[family][0], **channels).save_pretrained(tmp_path)
    expected = module_losses(str(tmp_path), family)
    runs = worlds(4).run(module_losses, str(tmp_path), family, layout=LAYOUTS["tp2_sp2"])
    for losses in runs:
        assert max(abs(a - b) / b for a, b in zip(losses, expected, strict=True)) <= 1e-9, (
            losses,
            expected,
        )


def test_the_lightning_module_trains_skyreels_v2(tmp_path):
    import lightning.pytorch as pl

    from vidpar.data import LatentsDataModule
    from vidpar.lightning import DiffusersFlowModule

    tiny.tiny_transformer("SkyReelsV2Transformer3DModel").save_pretrained(tmp_path / "model")
    tiny.make_tiny_latents(tmp_path / "latents", tmp_path / "model")
    module = DiffusersFlowModule(str(tmp_path / "model"), lr=1e-2)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    before = tiny.tiny_transformer("SkyReelsV2Transformer3DModel").state_dict()
    trainer.fit(module, datamodule=LatentsDataModule(str(tmp_path / "latents"), batch_size=2))
    assert type(module.model).__name__ == "SkyReelsV2Transformer3DModel"
    assert trainer.global_step == 2
    after = module.model.state_dict()
    assert not torch.equal(
        after["blocks.0.attn1.to_q.weight"], before["blocks.0.attn1.to_q.weight"]
    )
