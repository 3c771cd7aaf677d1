"""The trainer-state file of a checkpoint, stored so that ``torch.load(weights_only=True)``
reads it: no pickled objects, so reading it cannot run code.

Lightning's checkpoint dict may hold arbitrary objects (in ``hyper_parameters`` and
callback states); :func:`save_trainer_state` writes them as what the restricted unpickler
accepts: dict subclasses (``AttributeDict``, ``DictConfig``) and dataclasses as dicts,
sequences as lists or tuples, paths as strings, enums as their values, tensors as plain
tensors; anything else as its ``str``, with a warning naming its key.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence, Set
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

_LEAVES = (str, int, float, bool, type(None), bytes, torch.Size, torch.dtype, torch.device)


def loadable(value: Any, where: str = "trainer_state") -> Any:
    """``value`` rebuilt from what ``torch.load(weights_only=True)`` accepts (``where``
    names it in the warning about anything turned into a string)."""
    if type(value) in _LEAVES:
        return value
    if isinstance(value, torch.Tensor):
        return value.detach() if type(value) is torch.nn.Parameter else value
    if isinstance(value, enum.Enum):
        return loadable(value.value, where)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return loadable(dataclasses.asdict(value), where)
    if isinstance(value, Mapping):
        items = ((_key(k), loadable(v, f"{where}[{k!r}]")) for k, v in value.items())
        return OrderedDict(items) if isinstance(value, OrderedDict) else dict(items)
    if isinstance(value, tuple):
        return tuple(loadable(v, f"{where}[{i}]") for i, v in enumerate(value))
    if isinstance(value, Sequence | Set) and not isinstance(value, str | bytes):
        return [loadable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    for leaf in (bool, int, float, str):  # subclasses of plain values (e.g. numpy's)
        if isinstance(value, leaf):
            return leaf(value)
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return loadable(value.item(), where)
    logger.warning(
        "vidpar: the checkpoint stores %s (a %s) as its string: checkpoints hold only plain "
        "values and tensors",
        where,
        type(value).__name__,
    )
    return str(value)


def _key(key: Any) -> Any:
    return key if type(key) in (str, int, bool, float, type(None)) else str(key)


def save_trainer_state(state: dict[str, Any], path: Path) -> None:
    """Write ``state`` to ``path`` so that :func:`load_trainer_state` can read it."""
    torch.save(loadable(state), path)


def load_trainer_state(path: str | os.PathLike) -> dict[str, Any]:
    """Read a trainer-state file without unpickling objects (``weights_only=True``)."""
    try:
        return torch.load(Path(path), weights_only=True)
    except Exception as err:  # the restricted unpickler's refusal of an object
        if "weights_only" not in str(err) and "Weights only" not in str(err):
            raise
        raise ValueError(
            f"{path} holds objects other than plain values and tensors, which vidpar does not "
            "unpickle (they could run code). Re-save the checkpoint with this vidpar, or "
            "share the weights as the exported .safetensors file "
            "(vidpar.lightning.export_full_checkpoint)."
        ) from None
