"""Prompts to embeddings as diffusers' Wan pipelines make them, with the text encoder
sharded over the ranks of a dp replica (FSDP2) so that no rank holds all of it, not even
while loading (built on the meta device, each rank reads its rows of the safetensors).

The parent tokenizes (cleaning and truncating as ``WanPipeline`` does, with a warning);
the workers of a replica split the texts between them, encode their part with the
sharded encoder and all-gather the embeddings, so each text is encoded once per replica.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

logger = logging.getLogger(__name__)


def load_tokenizer(folder: str | os.PathLike):
    """The tokenizer of a pipeline's ``tokenizer/`` folder (local files only)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.fspath(folder), local_files_only=True)


def load_text_encoder(
    folder: str | os.PathLike,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    group: dist.ProcessGroup | None = None,
) -> nn.Module:
    """The text encoder of a pipeline's ``text_encoder/`` folder (the ``transformers`` class
    its ``config.json`` names, e.g. ``UMT5EncoderModel``) in ``dtype`` on ``device``, frozen.

    With a ``group`` of several ranks it comes out FSDP2-sharded over them (each block, then
    the rest) and no rank ever holds it whole: the module is built on the meta device,
    sharded, and each rank reads only its rows of each weight from the folder's
    safetensors (``safe_open(...).get_slice``). Without a group, the whole encoder is read
    tensor by tensor straight onto ``device``. Tied weights (UMT5's ``shared`` and
    ``encoder.embed_tokens``) stay one parameter; buffers the files lack (non-persistent
    ones) are set by the model's own ``_init_weights``, as ``from_pretrained`` sets them.
    """
    cls, config = _encoder_class(Path(folder))
    with torch.device("meta"):  # nothing allocated: every value comes from the files
        model = cls(config)
    model.to(dtype)
    for name, module in model.named_modules():  # as from_pretrained keeps them
        if any(part in _float32_modules(cls, dtype) for part in name.split(".")):
            module.to(torch.float32)
    model.eval().requires_grad_(False)
    device = torch.device(device)
    if group is not None:
        _shard(model, group, device)
    model.to_empty(device=device)
    if group is None and hasattr(model, "tie_weights"):
        model.tie_weights()  # to_empty gives each module its own tensor
    with torch.no_grad():
        missing = _read_weights(model, Path(folder), group)
        for name in missing:
            owner = model.get_submodule(name.rpartition(".")[0])
            if not hasattr(model, "_init_weights"):
                raise ValueError(f"{folder} has no buffer {name} and {cls.__name__} cannot make it")
            model._init_weights(owner)
    return model


def _encoder_class(folder: Path):
    """The ``transformers`` class ``folder/config.json`` names, and its config."""
    import json

    import transformers

    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json: not a text encoder folder")
    config = json.loads((folder / "config.json").read_text())
    names = config.get("architectures") or ["UMT5EncoderModel"]
    cls = getattr(transformers, names[0], None)
    if cls is None:
        raise ValueError(f"{folder}/config.json names {names[0]!r}, unknown to transformers")
    return cls, cls.config_class.from_pretrained(os.fspath(folder), local_files_only=True)


def _float32_modules(cls: type, dtype: torch.dtype) -> set[str]:
    """The module names ``from_pretrained`` keeps in float32 at ``dtype``."""
    keep: set[str] = set()
    if dtype in (torch.float16, torch.bfloat16):
        keep |= set(getattr(cls, "_keep_in_fp32_modules_strict", None) or ())
    if dtype == torch.float16:
        keep |= set(getattr(cls, "_keep_in_fp32_modules", None) or ())
    return keep


def _read_weights(model: nn.Module, folder: Path, group: dist.ProcessGroup | None) -> list[str]:
    """Each parameter (and buffer the files hold) of ``model`` filled from the safetensors
    of ``folder``; a sharded (FSDP2, ``Shard(0)``) parameter gets only this rank's rows,
    read as a slice. Returns the names of the buffers the files lack."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder} holds no .safetensors weights")
    rank = 0 if group is None else dist.get_rank(group)
    size = 1 if group is None else dist.get_world_size(group)
    names: dict[int, list[str]] = {}  # a parameter's names, tied ones included
    tensors: dict[int, torch.Tensor] = {}
    for name, tensor in [
        *model.named_parameters(remove_duplicate=False),
        *model.named_buffers(remove_duplicate=False),
    ]:
        names.setdefault(id(tensor), []).append(name)
        tensors[id(tensor)] = tensor
    buffer_ids = {id(b) for b in model.buffers()}
    handles = [safe_open(str(f), framework="pt") for f in files]
    where = {key: h for h in handles for key in h.keys()}  # noqa: SIM118 (not a dict)
    missing = []
    for key, tensor in tensors.items():
        found = next((n for n in names[key] if n in where), None)
        if found is None:
            if key in buffer_ids:
                missing.append(names[key][0])  # a buffer the class computes
                continue
            raise ValueError(f"{folder} has no weight {' or '.join(names[key])}")
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        rows = slice(None)
        if hasattr(tensor, "to_local") and tensor.dim() > 0 and size > 1:
            per_rank = -(-tensor.shape[0] // size)  # torch.chunk's split, as Shard(0)
            start = min(rank * per_rank, tensor.shape[0])
            rows = slice(start, min(start + per_rank, tensor.shape[0]))
        data = (
            where[found].get_slice(found)[rows]
            if tensor.dim() > 0
            else where[found].get_tensor(found)
        )
        if tuple(data.shape) != tuple(local.shape):
            raise ValueError(
                f"{folder}: {found} is {tuple(data.shape)} for this rank, the model wants "
                f"{tuple(local.shape)}"
            )
        local.copy_(data)
    return missing


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


def _shard(text_encoder: nn.Module, group: dist.ProcessGroup, device: torch.device) -> None:
    """FSDP2 over ``group`` (each block, then the rest), the shards to be on ``device``."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    mesh = DeviceMesh.from_group(group, device.type)
    blocks = [m for m in text_encoder.modules() if type(m).__name__.endswith("Block")]
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=True)
    fully_shard(text_encoder, mesh=mesh, reshard_after_forward=True)


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
