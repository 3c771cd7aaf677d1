"""vidpar.models.parallelize_vae: diffusers' AutoencoderKLWan split in rows over gloo
worlds of 2 and 4 decodes and encodes exactly what the whole VAE does (float64), with a
latent height of 5 (a multiple of neither 2 nor 4), three resolution levels, attention in
the mid-blocks and the causal frame cache, for Wan2.1's layout and Wan2.2's (residual
blocks, patches); the replica group; a VAE it cannot split runs whole with a log line."""

from __future__ import annotations

import logging

import pytest
import torch
from diffusers import AutoencoderKL, AutoencoderKLWan

from vidpar.config import ParallelConfig
from vidpar.distributed import telemetry
from vidpar.distributed.state import get_parallel_state
from vidpar.models import parallelize_vae

#: Wan2.1's layout at three levels (4× in space, 2× in time); attention in the mid-blocks
#: (diffusers cannot run encoder attention at other scales: its down blocks pass it the
#: frame cache).
WAN21 = {
    "base_dim": 8,
    "z_dim": 4,
    "dim_mult": [1, 2, 2],
    "num_res_blocks": 1,
    "attn_scales": [],
    "temperal_downsample": [False, True],
    "latents_mean": [0.0] * 4,
    "latents_std": [1.0] * 4,
    "scale_factor_temporal": 2,
    "scale_factor_spatial": 4,
}
#: Wan2.2's: residual up/down blocks (pixel-shuffle shortcuts), 2×2 patches, 8× in space.
WAN22 = WAN21 | {
    "decoder_base_dim": 12,
    "is_residual": True,
    "in_channels": 12,
    "out_channels": 12,
    "patch_size": 2,
    "scale_factor_spatial": 8,
}
VARIANTS = {"wan2.1": WAN21, "wan2.2": WAN22}
#: [B, C, T, H, W]: 3 latent frames, 5 latent rows (a multiple of neither 2 nor 4).
LATENT = (1, 4, 3, 5, 6)
TOLERANCE = 1e-10


@pytest.fixture(scope="module")
def vae_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("parallel-vae")
    for name, config in VARIANTS.items():
        torch.manual_seed(0)
        AutoencoderKLWan(**config).save_pretrained(str(root / name))
    return root


def _inputs(scale: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents, and a video of 5 frames whose height gives 5 latent rows."""
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(LATENT, generator=generator, dtype=torch.float64)
    video_shape = (1, 3, 5, LATENT[3] * scale, LATENT[4] * scale)
    video = torch.rand(video_shape, generator=generator, dtype=torch.float64) * 2 - 1
    return latents, video


def _load(path) -> AutoencoderKLWan:
    return AutoencoderKLWan.from_pretrained(str(path)).to(torch.float64).eval()


@torch.no_grad()
def _split_results(path) -> dict[str, object]:
    vae = parallelize_vae(_load(path))
    latents, video = _inputs(vae.spatial_compression_ratio)
    recorder = telemetry.start_recording()
    try:
        decoded = vae.decode(latents).sample
        moments = vae.encode(video).latent_dist.parameters
    finally:
        telemetry.stop_recording()
    # Fewer latent rows than ranks: this decode runs whole on every rank.
    one_row = vae.decode(latents[:, :, :1, :1]).sample
    return {
        "decoded": decoded,
        "moments": moments,
        "one_row": one_row,
        "ops": sorted({r.op for r in recorder.records}),
    }


@pytest.mark.parametrize(("variant", "size"), [("wan2.1", 2), ("wan2.1", 4), ("wan2.2", 2)])
def test_split_vae_equals_whole(worlds, vae_dirs, variant, size):
    path = vae_dirs / variant
    with torch.no_grad():
        whole = _load(path)
        latents, video = _inputs(whole.spatial_compression_ratio)
        decoded = whole.decode(latents).sample
        moments = whole.encode(video).latent_dist.parameters
        one_row = whole.decode(latents[:, :, :1, :1]).sample
    results = worlds(size).run(_split_results, path, layout=ParallelConfig(sp=size))
    for rank, result in enumerate(results):
        for name, reference in (("decoded", decoded), ("moments", moments), ("one_row", one_row)):
            got = result[name]
            assert got.shape == reference.shape, (rank, name)
            error = ((got - reference).abs().max() / reference.abs().max()).item()
            assert error <= TOLERANCE, (rank, name, error)
        assert {"send", "recv", "all_gather"} <= set(result["ops"]), result["ops"]


def _replica_ranks() -> list[int]:
    return get_parallel_state().group("replica").ranks


def test_replica_group_is_the_ranks_of_one_batch(worlds):
    ranks = worlds(4).run(_replica_ranks, layout=ParallelConfig(dp=2, sp=2))
    assert ranks == [[0, 1], [0, 1], [2, 3], [2, 3]]


def test_unsupported_vae_runs_whole_with_a_log_line(caplog):
    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=2)
    decode = vae.decode
    with caplog.at_level(logging.WARNING, logger="vidpar.models.parallel_vae"):
        assert parallelize_vae(vae) is vae
    assert "AutoencoderKL cannot be split over ranks" in caplog.text
    assert "runs whole on every rank" in caplog.text
    assert vae.decode == decode
