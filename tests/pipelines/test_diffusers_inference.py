"""DiffusersVideoGenerator through the Executor (cfg2 × tp2, 4 CPU workers, float64) against
the plain diffusers models in this process: guided sampling, prompts as files or tensors,
VAE decoding to an mp4, and a LoRA written by diffusers merged under tp2."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from diffusers.loaders.lora_pipeline import WanLoraLoaderMixin
from safetensors.torch import load_file

from vidpar import ParallelConfig
from vidpar.models.testing import TINY_WAN, make_tiny_latents, make_tiny_wan, make_tiny_wan_vae
from vidpar.pipelines import DiffusersVideoGenerator, FlowMatchEulerSampler, read_video

#: 5 frames of 12 × 12 pixels: latents 3 × 6 × 6 with the tiny VAE, 27 tokens (odd).
VIDEO = {"num_frames": 5, "height": 12, "width": 12}
SAMPLING = {"steps": 3, "guidance_scale": 4.0, "shift": 3.0, "seed": 7}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("diffusers")
    model = make_tiny_wan(root / "tiny-wan")
    return model, make_tiny_wan_vae(root / "tiny-wan-vae"), make_tiny_latents(root / "lat", model)


@pytest.fixture(scope="module")
def generator(folders):
    model, vae, _ = folders
    layout = ParallelConfig(cfg=2, tp=2)
    with DiffusersVideoGenerator(model, layout, vae=vae, dtype=torch.float64, devices="cpu") as gen:
        yield gen


def plain_wan(delta: dict[str, torch.Tensor] | None = None) -> WanTransformer3DModel:
    """The tiny Wan as diffusers builds it (make_tiny_wan's seed), plus ``delta``."""
    torch.manual_seed(0)
    model = WanTransformer3DModel(**TINY_WAN).double().eval()
    with torch.no_grad():
        for name, d in (delta or {}).items():
            model.get_parameter(name).add_(d.double())
    return model


def reference(model, cond: torch.Tensor, null: torch.Tensor, latent_shape=(16, 3, 6, 6)):
    """Guided Euler sampling of the plain model in this process (noise as the workers')."""
    gen = torch.Generator().manual_seed(SAMPLING["seed"])
    noise = torch.randn((len(cond), *latent_shape), generator=gen).double()

    def velocity(x, t, c):
        return model(x, 1000 * t, c, return_dict=False)[0]

    sampler = FlowMatchEulerSampler(SAMPLING["steps"], shift=SAMPLING["shift"])
    with torch.no_grad():
        return sampler.sample(velocity, noise, cond, null, SAMPLING["guidance_scale"])


def prompts(folders, *indices):
    """Prompt and negative embeddings of latents-folder samples, zero-padded to one length."""
    files = [load_file(str(folders[2] / f"{i:06d}.safetensors")) for i in indices]
    length = max(len(f[k]) for f in files for k in ("prompt_embeds", "negative_prompt_embeds"))

    def pad(e):
        return torch.cat([e, e.new_zeros(length - len(e), e.shape[1])]).double()

    cond = torch.stack([pad(f["prompt_embeds"]) for f in files])
    return cond, torch.stack([pad(f["negative_prompt_embeds"]) for f in files])


def assert_close(got, expect, rel=1e-9):
    err = (got.double() - expect.double()).abs().max().item()
    assert err <= rel * expect.abs().max().item(), err


def test_cfg2_tp2_equals_one_process_for_files_and_tensors(generator, folders):
    cond, null = prompts(folders, 0, 1)
    expect = reference(plain_wan(), cond, null)
    one = generator.generate(
        folders[2] / "000000.safetensors", **VIDEO, **SAMPLING, output_type="latent"
    )
    assert one.shape == (1, 16, 3, 6, 6)
    # Sample 0's prompts are shorter than sample 1's: a batch pads them with zeros, which
    # the reference above did too; alone, sample 0 sees only its own length.
    alone = reference(plain_wan(), *prompts(folders, 0))
    assert_close(one[0], alone[0])
    batch = generator.generate(
        [cond[0], cond[1]], list(null), **VIDEO, **SAMPLING, output_type="latent"
    )
    assert_close(batch, expect)
    assert not torch.allclose(batch[0], batch[1])


def test_the_vae_decodes_to_an_mp4_with_the_right_frame_count(generator, folders, tmp_path):
    out = tmp_path / "video.mp4"
    videos = generator.generate(
        folders[2] / "000002.safetensors", **VIDEO, **SAMPLING, output=out, output_type="float"
    )
    assert videos.shape == (1, 3, 5, 12, 12)  # 1 + 2 · (3 - 1) frames of 2 × 6 pixels
    vae = AutoencoderKLWan.from_pretrained(str(folders[1])).double().eval()
    latents = reference(plain_wan(), *prompts(folders, 2))
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1).double()
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1).double()
    with torch.no_grad():  # as WanPipeline decodes: latents / (1 / std) + mean
        expect = vae.decode(latents / (1.0 / std) + mean, return_dict=False)[0]
    assert_close(videos, expect)
    frames = read_video(out)
    assert frames.shape[0] == 5 and frames.shape[-1] == 3
    with pytest.raises(ValueError, match=r"num_frames = 1 \+ 2·k"):
        generator.generate(folders[2] / "000002.safetensors", num_frames=4, height=12, width=12)


def test_a_diffusers_lora_merges_under_tp2_and_unmerges_exactly(generator, folders, tmp_path):
    gen = torch.Generator().manual_seed(1)
    shapes = {  # column-parallel, row-parallel and FFN projections (out, in)
        "blocks.0.attn1.to_q": (32, 32),
        "blocks.0.attn1.to_out.0": (32, 32),
        "blocks.1.ffn.net.0.proj": (64, 32),
    }
    layers = {}
    for module, (out, inp) in shapes.items():
        layers[f"{module}.lora_A.weight"] = torch.randn(2, inp, generator=gen) * 0.3
        layers[f"{module}.lora_B.weight"] = torch.randn(out, 2, generator=gen) * 0.3
    WanLoraLoaderMixin.save_lora_weights(
        tmp_path,
        transformer_lora_layers=layers,
        transformer_lora_adapter_metadata={"r": 2, "lora_alpha": 4},
    )
    file = tmp_path / "pytorch_lora_weights.safetensors"
    sample = folders[2] / "000003.safetensors"
    before = generator.generate(sample, **VIDEO, **SAMPLING, output_type="latent")
    targets = generator.set_lora_adapter("style", file, scale=0.5)
    assert targets == sorted(f"{m}.weight" for m in shapes)
    generator.merge_lora()
    merged = generator.generate(sample, **VIDEO, **SAMPLING, output_type="latent")
    lora = {k: v.double() for k, v in layers.items()}
    delta = {  # PEFT's update: scale · alpha / r · B @ A
        f"{m}.weight": 0.5 * 4 / 2 * lora[f"{m}.lora_B.weight"] @ lora[f"{m}.lora_A.weight"]
        for m in shapes
    }
    assert_close(merged, reference(plain_wan(delta), *prompts(folders, 3)))
    assert (merged - before).abs().max() > 1e-3
    assert generator.unmerge_lora() == "style"
    after = generator.generate(sample, **VIDEO, **SAMPLING, output_type="latent")
    assert torch.equal(after, before)
