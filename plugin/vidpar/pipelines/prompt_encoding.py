"""Prompts to embeddings as diffusers' Wan pipelines make them, with the text encoder
sharded over the ranks of a dp replica (FSDP2) so that no rank holds all of it.

The parent tokenizes (cleaning and truncating as ``WanPipeline`` does, with a warning);
the workers of a replica split the texts between them, encode their part with the
sharded encoder and all-gather the embeddings, so each text is encoded once per replica.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

logger = logging.getLogger(__name__)


def load_tokenizer(folder: str | os.PathLike):
    """The tokenizer of a pipeline's ``tokenizer/`` folder (local files only)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.fspath(folder), local_files_only=True)


def load_text_encoder(folder: str | os.PathLike, dtype: torch.dtype) -> nn.Module:
    """The text encoder of a pipeline's ``text_encoder/`` folder (the ``transformers`` class
    its ``config.json`` names, e.g. ``UMT5EncoderModel``), from safetensors, on the CPU."""
    import json
    from pathlib import Path

    import transformers

    config = json.loads((Path(folder) / "config.json").read_text())
    names = config.get("architectures") or ["UMT5EncoderModel"]
    cls = getattr(transformers, names[0], None)
    if cls is None:
        raise ValueError(f"{folder}/config.json names {names[0]!r}, unknown to transformers")
    model = cls.from_pretrained(
        os.fspath(folder), torch_dtype=dtype, use_safetensors=True, local_files_only=True
    )
    return model.eval().requires_grad_(False)


def tokenize(
    tokenizer, texts: Sequence[str], max_sequence_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` ``[N, max_sequence_length]`` of the cleaned ``texts``,
    as ``WanPipeline`` makes them; texts longer than that are cut, with a warning."""
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean

    cleaned = [prompt_clean(t) for t in texts]
    lengths = [len(ids) for ids in tokenizer(cleaned, add_special_tokens=True).input_ids]
    for text, length in zip(texts, lengths, strict=True):
        if length > max_sequence_length:
            logger.warning(
                "the prompt %r is %d tokens long: cut to max_sequence_length=%d, as diffusers does",
                text[:60] + ("…" if len(text) > 60 else ""),
                length,
                max_sequence_length,
            )
    inputs = tokenizer(
        cleaned,
        padding="max_length",
        max_length=max_sequence_length,
        truncation=True,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    return inputs.input_ids, inputs.attention_mask


def encode(text_encoder: nn.Module, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Embeddings ``[N, L, D]`` in the encoder's dtype, zero past each text's tokens (as
    ``WanPipeline._get_t5_prompt_embeds``)."""
    device = next(text_encoder.parameters()).device
    with torch.no_grad():
        hidden = text_encoder(input_ids.to(device), mask.to(device)).last_hidden_state
    keep = mask.to(hidden.device).gt(0).unsqueeze(-1)
    # The tokens are a prefix (right padding), so zeroing past them is diffusers' cut-and-pad.
    return torch.where(keep, hidden, torch.zeros((), dtype=hidden.dtype, device=hidden.device))


def shard_text_encoder(
    text_encoder: nn.Module, group: dist.ProcessGroup | None, device: torch.device
) -> nn.Module:
    """``text_encoder`` sharded with FSDP2 over ``group`` (each block, then the rest), its
    shards on ``device``; the whole encoder on ``device`` without a group."""
    if group is None:
        return text_encoder.to(device)
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    mesh = DeviceMesh.from_group(group, device.type)
    blocks = [m for m in text_encoder.modules() if type(m).__name__.endswith("Block")]
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=True)
    fully_shard(text_encoder, mesh=mesh, reshard_after_forward=True)
    return text_encoder


def encode_on_replica(
    text_encoder: nn.Module,
    input_ids: torch.Tensor,
    mask: torch.Tensor,
    group: dist.ProcessGroup | None,
) -> torch.Tensor:
    """The embeddings of all ``input_ids`` on every rank of ``group``: each rank encodes
    an equal share (padded with copies of the last text) and one all-gather joins them."""
    if group is None:
        return encode(text_encoder, input_ids, mask)
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    per_rank = -(-len(input_ids) // size)
    pad = per_rank * size - len(input_ids)
    ids = torch.cat([input_ids, input_ids[-1:].expand(pad, -1)])
    masks = torch.cat([mask, mask[-1:].expand(pad, -1)])
    share = slice(rank * per_rank, (rank + 1) * per_rank)
    mine = encode(text_encoder, ids[share], masks[share]).contiguous()
    parts = [torch.empty_like(mine) for _ in range(size)]
    dist.all_gather(parts, mine, group=group)
    return torch.cat(parts)[: len(input_ids)]
