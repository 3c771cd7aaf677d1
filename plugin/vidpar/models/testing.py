"""Tiny, randomly initialised diffusers folders to try vidpar on (and to test it with).

``make_tiny_folders(".")`` writes, in a few seconds, folders shaped like the real ones:
``tiny-wan/`` (a ``WanTransformer3DModel``) and ``tiny-wan-vae/`` (an ``AutoencoderKLWan``)
saved with ``save_pretrained``, ``latents/`` (a latents folder, :mod:`vidpar.data.latents`,
that fits the model) and ``tiny-wan-lora/`` (a LoRA for it, saved by diffusers' Wan LoRA
saver), ``tiny-wan-pipeline/``, a whole ``WanPipeline`` folder (tokenizer, UMT5 text
encoder, transformer, VAE, UniPC scheduler) that diffusers' own ``WanPipeline.from_pretrained``
loads, and ``tiny-wan-i2v-pipeline/`` (a ``WanImageToVideoPipeline`` with a CLIP image
encoder). Each has its own ``make_tiny_*`` function. Nothing is downloaded; the same seed
writes the same weights.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from vidpar.models.pretrained import find_model_folder, read_config

#: A two-block Wan with 4 heads (so tp2 × sp2 splits them) and Wan's 16 latent channels.
TINY_WAN: dict[str, Any] = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 4,
    "attention_head_dim": 8,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 32,
    "freq_dim": 32,
    "ffn_dim": 64,
    "num_layers": 2,
    "rope_max_seq_len": 64,
}
#: A one-level Wan VAE: latents of 16 channels, frames ``1 + 2 (T - 1)``, pixels ``2×``.
TINY_WAN_VAE: dict[str, Any] = {
    "base_dim": 8,
    "z_dim": 16,
    "dim_mult": [1, 1],
    "num_res_blocks": 1,
    "attn_scales": [],
    "temperal_downsample": [True],
    "scale_factor_temporal": 2,
    "scale_factor_spatial": 2,
}


def make_tiny_wan(path: str | os.PathLike, seed: int = 0, **config: Any) -> Path:
    """Save a tiny ``WanTransformer3DModel`` (``TINY_WAN`` updated with ``config``, e.g.
    ``in_channels=3, out_channels=3`` for pixel clips) to ``path``; returns ``path``."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    model = WanTransformer3DModel(**{**TINY_WAN, **config})
    model.save_pretrained(str(path))
    return Path(path)


#: A two-block LTX-Video on tokens of 8 channels (patch 1), 4 heads.
TINY_LTX: dict[str, Any] = {
    "in_channels": 8,
    "out_channels": 8,
    "num_attention_heads": 4,
    "attention_head_dim": 8,
    "cross_attention_dim": 32,
    "num_layers": 2,
    "caption_channels": 16,
}

#: What the tiny HunyuanVideo 1 and 1.5 share: 4 heads of 8 (rope 2 + 2 + 4), text 16 wide.
_TINY_HUNYUAN: dict[str, Any] = {
    "in_channels": 4,
    "out_channels": 4,
    "num_attention_heads": 4,
    "attention_head_dim": 8,
    "num_refiner_layers": 1,
    "text_embed_dim": 16,
    "rope_axes_dim": (2, 2, 4),
}
#: A HunyuanVideo of one dual- and one single-stream block.
TINY_HUNYUAN_VIDEO: dict[str, Any] = {
    **_TINY_HUNYUAN,
    "num_layers": 1,
    "num_single_layers": 1,
    "patch_size": 1,
    "pooled_projection_dim": 8,
}
#: A two-block HunyuanVideo 1.5 with ByT5 text and images 8 wide.
TINY_HUNYUAN_VIDEO_15: dict[str, Any] = {
    **_TINY_HUNYUAN,
    "num_layers": 2,
    "text_embed_2_dim": 8,
    "image_embed_dim": 8,
}

#: A two-block Mochi (4 heads of 8), patch 2, text 16 wide.
TINY_MOCHI: dict[str, Any] = {
    "patch_size": 2,
    "num_attention_heads": 4,
    "attention_head_dim": 8,
    "num_layers": 2,
    "pooled_projection_dim": 16,
    "in_channels": 4,
    "text_embed_dim": 16,
    "time_embed_dim": 4,
    "max_sequence_length": 16,
}

#: A two-block CogVideoX 1.0 (rotary embedding) of 4 heads of 16, latents 4 wide
#: (``patch_size_t=2``: 1.5).
TINY_COGVIDEOX: dict[str, Any] = {
    "num_attention_heads": 4,
    "attention_head_dim": 16,
    "in_channels": 4,
    "out_channels": 4,
    "time_embed_dim": 16,
    "text_embed_dim": 16,
    "num_layers": 2,
    "sample_width": 6,
    "sample_height": 6,
    "sample_frames": 9,
    "patch_size": 2,
    "max_text_seq_length": 5,
    "use_rotary_positional_embeddings": True,
}

#: The tiny config of each family :func:`tiny_transformer` makes.
TINY_FAMILIES: dict[str, dict[str, Any]] = {
    "SkyReelsV2Transformer3DModel": TINY_WAN,  # Wan's layers
    "LTXVideoTransformer3DModel": TINY_LTX,
    "HunyuanVideoTransformer3DModel": TINY_HUNYUAN_VIDEO,
    "HunyuanVideo15Transformer3DModel": TINY_HUNYUAN_VIDEO_15,
    "MochiTransformer3DModel": TINY_MOCHI,
    "CogVideoXTransformer3DModel": TINY_COGVIDEOX,
    "ChronoEditTransformer3DModel": TINY_WAN,  # Wan's layers; diffusers' _cp_plan only
}


def tiny_transformer(class_name: str, seed: int = 0, **config: Any) -> Any:
    """A tiny random diffusers transformer of a family of :data:`TINY_FAMILIES`, its tiny
    config updated with ``config``."""
    import diffusers

    torch.manual_seed(seed)
    return getattr(diffusers, class_name)(**{**TINY_FAMILIES[class_name], **config})


def make_tiny_wan_vae(path: str | os.PathLike, seed: int = 0, **config: Any) -> Path:
    """Save a tiny ``AutoencoderKLWan`` (``TINY_WAN_VAE`` updated with ``config``) to
    ``path``; returns ``path``."""
    from diffusers import AutoencoderKLWan

    config = {**TINY_WAN_VAE, **config}
    if config["z_dim"] != 16:  # the default statistics are Wan's 16 channels'
        config.setdefault("latents_mean", [0.0] * config["z_dim"])
        config.setdefault("latents_std", [1.0] * config["z_dim"])
    torch.manual_seed(seed)
    AutoencoderKLWan(**config).save_pretrained(str(path))
    return Path(path)


def make_tiny_latents(
    path: str | os.PathLike,
    model_path: str | os.PathLike,
    num_samples: int = 4,
    size: tuple[int, int, int] = (3, 6, 6),
    seed: int = 0,
) -> Path:
    """Write a latents folder of ``num_samples`` random samples that fit the transformer at
    ``model_path``: latents ``[in_channels, *size]`` (the default 3 × 6 × 6 makes 27 tokens
    with patch 1×2×2: no sp size divides it) and prompts of 3 to 6 tokens of its
    ``text_dim`` (with negative prompts of 2 tokens); for other families, the widths their
    plan trains on (:func:`~vidpar.models.parallelize.latent_widths`)."""
    from vidpar.data.latents import write_latents_folder
    from vidpar.models.parallelize import latent_widths

    config = read_config(find_model_folder(model_path))
    gen = torch.Generator().manual_seed(seed)
    channels, dim = latent_widths(config)
    latents = torch.randn((num_samples, channels, *size), generator=gen)
    prompts = [torch.randn(3 + i % 4, dim, generator=gen) for i in range(num_samples)]
    negative = [torch.randn(2, dim, generator=gen) for _ in range(num_samples)]
    texts = [f"tiny prompt {i}" for i in range(num_samples)]
    return write_latents_folder(path, latents, prompts, negative, prompts=texts)


def make_tiny_wan_lora(
    path: str | os.PathLike, model_path: str | os.PathLike, rank: int = 2, seed: int = 0
) -> Path:
    """Save a random LoRA for the attention of the transformer at ``model_path`` in
    diffusers' format (``pytorch_lora_weights.safetensors``, ``lora_alpha = 2 · rank``);
    returns the file."""
    from diffusers.loaders.lora_pipeline import WanLoraLoaderMixin

    config = read_config(find_model_folder(model_path))
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    gen = torch.Generator().manual_seed(seed)
    layers = {}
    for block in range(config["num_layers"]):
        for proj in ("to_q", "to_k", "to_v", "to_out.0"):
            name = f"blocks.{block}.attn1.{proj}"
            layers[f"{name}.lora_A.weight"] = torch.randn(rank, dim, generator=gen) * 0.1
            layers[f"{name}.lora_B.weight"] = torch.randn(dim, rank, generator=gen) * 0.1
    metadata = {"r": rank, "lora_alpha": 2 * rank}
    WanLoraLoaderMixin.save_lora_weights(
        str(path), transformer_lora_layers=layers, transformer_lora_adapter_metadata=metadata
    )
    return Path(path) / "pytorch_lora_weights.safetensors"


#: The words the tiny tokenizer knows (any other word is ``<unk>``).
_WORDS = "a an the red blue green white fox cat dog bird running walking through over in on "
TINY_WORDS: tuple[str, ...] = (*_WORDS.split(), "snow", "sky", "tree", "river", "night", "blurry")
#: A two-layer UMT5 encoder whose width is the tiny Wan's ``text_dim``.
TINY_UMT5: dict[str, Any] = {
    "d_model": TINY_WAN["text_dim"],
    "d_kv": 8,
    "d_ff": 64,
    "num_layers": 2,
    "num_heads": 4,
    "relative_attention_num_buckets": 8,
    "relative_attention_max_distance": 16,
    "feed_forward_proj": "gated-gelu",
    "pad_token_id": 0,
    "eos_token_id": 1,
    "decoder_start_token_id": 0,
}
#: Wan's scheduler: UniPC on flow sigmas with Wan2.1's ``flow_shift``.
TINY_SCHEDULER: dict[str, Any] = {
    "prediction_type": "flow_prediction",
    "use_flow_sigmas": True,
    "flow_shift": 3.0,
}


def make_tiny_tokenizer(path: str | os.PathLike) -> Path:
    """Save a word-level tokenizer of :data:`TINY_WORDS` (``<pad>`` 0, ``</s>`` 1 appended
    to every text, ``<unk>`` 2), built with ``tokenizers``, as ``tokenizer.json``."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2} | {w: i + 3 for i, w in enumerate(TINY_WORDS)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", 1)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=512,
    )
    fast.save_pretrained(str(path))
    return Path(path)


def make_tiny_wan_pipeline(
    path: str | os.PathLike,
    seed: int = 0,
    boundary_ratio: float | None = None,
    expand_timesteps: bool = False,
) -> Path:
    """Save a whole tiny ``WanPipeline`` folder (``model_index.json``, ``tokenizer/``,
    ``text_encoder/``, ``transformer/``, ``vae/``, ``scheduler/``) with diffusers' own
    ``save_pretrained``; returns ``path``. Videos: ``num_frames = 1 + 2 k``, height and
    width multiples of 16 (``WanPipeline``'s rule). ``boundary_ratio`` adds a second
    transformer (``transformer_2``, Wan2.2 A14B's low-noise expert); ``expand_timesteps``
    gives the per-token timesteps of Wan2.2 TI2V."""
    from diffusers import (
        AutoencoderKLWan,
        UniPCMultistepScheduler,
        WanPipeline,
        WanTransformer3DModel,
    )
    from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

    path = Path(path)
    make_tiny_tokenizer(path / "tokenizer")
    torch.manual_seed(seed)
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(TINY_WORDS) + 3, **TINY_UMT5))
    pipeline = WanPipeline(
        tokenizer=AutoTokenizer.from_pretrained(str(path / "tokenizer")),
        text_encoder=text_encoder,
        vae=AutoencoderKLWan(**TINY_WAN_VAE),
        scheduler=UniPCMultistepScheduler(**TINY_SCHEDULER),
        transformer=WanTransformer3DModel(**TINY_WAN),
        transformer_2=None if boundary_ratio is None else WanTransformer3DModel(**TINY_WAN),
        boundary_ratio=boundary_ratio,
        expand_timesteps=expand_timesteps,
    )
    pipeline.save_pretrained(str(path))
    return path


#: A two-layer CLIP vision tower of 32-pixel images (its penultimate layer feeds Wan I2V).
TINY_CLIP_VISION: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": 32,
    "patch_size": 8,
    "projection_dim": 32,
}
#: Wan2.1 I2V's transformer: noise, the first-frame mask (one channel per frame of a latent
#: frame: the tiny VAE's 2) and the first frame's latents in; image tokens too.
TINY_WAN_I2V: dict[str, Any] = {
    **TINY_WAN,
    "in_channels": 2 * TINY_WAN_VAE["z_dim"] + TINY_WAN_VAE["scale_factor_temporal"],
    "image_dim": TINY_CLIP_VISION["hidden_size"],
    "added_kv_proj_dim": TINY_WAN["num_attention_heads"] * TINY_WAN["attention_head_dim"],
}


def make_tiny_wan_i2v_pipeline(path: str | os.PathLike, seed: int = 0) -> Path:
    """Save a whole tiny ``WanImageToVideoPipeline`` folder (a Wan2.1 I2V: the T2V folder's
    components, an I2V transformer, ``image_encoder/`` and ``image_processor/``) that
    diffusers' own ``WanImageToVideoPipeline.from_pretrained`` loads; returns ``path``."""
    from diffusers import (
        AutoencoderKLWan,
        UniPCMultistepScheduler,
        WanImageToVideoPipeline,
        WanTransformer3DModel,
    )
    from transformers import (
        AutoTokenizer,
        CLIPImageProcessor,
        CLIPVisionConfig,
        CLIPVisionModel,
        UMT5Config,
        UMT5EncoderModel,
    )

    path = Path(path)
    make_tiny_tokenizer(path / "tokenizer")
    torch.manual_seed(seed)
    side = TINY_CLIP_VISION["image_size"]
    pipeline = WanImageToVideoPipeline(
        tokenizer=AutoTokenizer.from_pretrained(str(path / "tokenizer")),
        text_encoder=UMT5EncoderModel(UMT5Config(vocab_size=len(TINY_WORDS) + 3, **TINY_UMT5)),
        vae=AutoencoderKLWan(**TINY_WAN_VAE),
        scheduler=UniPCMultistepScheduler(**TINY_SCHEDULER),
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": side}, crop_size={"height": side, "width": side}
        ),
        image_encoder=CLIPVisionModel(CLIPVisionConfig(**TINY_CLIP_VISION)),
        transformer=WanTransformer3DModel(**TINY_WAN_I2V),
    )
    pipeline.save_pretrained(str(path))
    return path


def make_tiny_folders(root: str | os.PathLike = ".") -> Path:
    """``tiny-wan/``, ``tiny-wan-vae/``, ``latents/``, ``tiny-wan-lora/``,
    ``tiny-wan-pipeline/`` and ``tiny-wan-i2v-pipeline/`` under ``root`` (the folders the
    README's examples name); returns ``root``."""
    root = Path(root)
    model = make_tiny_wan(root / "tiny-wan")
    make_tiny_wan_vae(root / "tiny-wan-vae")
    make_tiny_latents(root / "latents", model)
    make_tiny_wan_lora(root / "tiny-wan-lora", model)
    make_tiny_wan_pipeline(root / "tiny-wan-pipeline")
    make_tiny_wan_i2v_pipeline(root / "tiny-wan-i2v-pipeline")
    return root
