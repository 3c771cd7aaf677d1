"""Reading back W&B's offline run files (``run-<id>.wandb``): the run and its history."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK = 32768  # the file is LevelDB's log format: 32 KiB blocks of framed chunks
FRAME = 7  # crc32 (4 bytes), length (2), type (1: whole, 2: first, 3: middle, 4: last)


def records(path: Path) -> Iterator[wandb_internal_pb2.Record]:
    """Every record of a ``.wandb`` file, in order."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    pos, parts = FRAME, []  # after the file's own 7-byte header
    while pos + FRAME <= len(data):
        left = BLOCK - pos % BLOCK
        length, kind = struct.unpack_from("<HB", data, pos + 4)
        if left < FRAME or kind == 0:  # the padded end of a block
            pos += left
            continue
        parts.append(data[pos + FRAME : pos + FRAME + length])
        pos += FRAME + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(parts))
            parts = []
            yield record


@dataclass
class OfflineRun:
    """What a job logged to its offline W&B run."""

    dir: Path
    id: str = ""
    name: str = ""
    history: list[dict] = field(default_factory=list)


def read_run(run_dir: Path) -> OfflineRun:
    """The run in ``run_dir`` (an ``offline-run-*`` directory)."""
    (log,) = run_dir.glob("run-*.wandb")
    run = OfflineRun(run_dir)
    for record in records(log):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.id, run.name = record.run.run_id, record.run.display_name
        elif kind == "history":
            run.history.append(
                {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json)
                    for item in record.history.item
                }
            )
    return run
