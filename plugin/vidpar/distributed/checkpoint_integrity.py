"""Checkpoint integrity: a signed manifest of every file's size, CRC-32 and SHA-256,
checked before loading.

At save, each rank checksums the files it wrote (read back from the page cache) and rank 0
writes ``vidpar_manifest.json``: ``{"files": {name: {"size", "crc32", "sha256"}}, "crc32":
..., "hmac": ...}``, the ``crc32`` a checksum of the file table itself, the ``hmac`` its
signature with this user's key (:mod:`~vidpar.distributed.checkpoint_signing`). Before a
load, :func:`find_damage` checks the signature (a checkpoint without one, or signed by
another key, is refused unless trusted), then compares sizes (a truncated or missing file
is named at once, without reading anything) and then checksums, files in parallel threads
(``zlib.crc32`` and ``hashlib`` release the GIL). A trusted checkpoint without a manifest,
written by an older vidpar, is loaded unchecked, with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zlib
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from vidpar.distributed.checkpoint_signing import UntrustedCheckpointError, check_signature, sign
from vidpar.distributed.checkpoint_store import fsync_file

logger = logging.getLogger(__name__)

MANIFEST = "vidpar_manifest.json"
_CHUNK = 16 << 20
_PARALLEL_BYTES = 256 << 20


class CorruptCheckpointError(ValueError):
    """A checkpoint's files differ from what its save recorded (``damaged``: one line per
    file)."""

    def __init__(self, directory: Path, damaged: list[str]) -> None:
        self.directory = directory
        self.damaged = damaged
        shown = "; ".join(damaged[:5]) + ("; ..." if len(damaged) > 5 else "")
        super().__init__(
            f"The checkpoint {directory} is damaged, so it was not loaded: {shown}. Its files "
            "changed after the save wrote them (disk or copy errors, or an edit). Use another "
            "checkpoint (an older version, or one of another run), or start without it."
        )

    def __reduce__(self):
        return (type(self), (self.directory, self.damaged))


def crc32_of(path: Path) -> str:
    """The CRC-32 of a file's contents, as 8 hex digits."""
    return _digests(path)["crc32"]


def _digests(path: Path) -> dict[str, str]:
    """``{"crc32", "sha256"}`` of a file's contents (hex), in one read."""
    crc, sha = 0, hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buffer = bytearray(max(1, min(_CHUNK, os.fstat(f.fileno()).st_size)))
        view = memoryview(buffer)
        while n := f.readinto(buffer):
            crc = zlib.crc32(view[:n], crc)
            sha.update(view[:n])
    return {"crc32": f"{crc:08x}", "sha256": sha.hexdigest()}


def describe(directory: Path, names: Iterable[str]) -> dict[str, dict[str, int | str]]:
    """``{name: {"size", "crc32", "sha256"}}`` of the files ``names`` in ``directory``."""
    names = sorted(set(names))
    sums = _checksums(directory, names)
    return {
        name: {"size": (directory / name).stat().st_size, **digests}
        for name, digests in zip(names, sums, strict=True)
    }


def write_manifest(directory: Path, files: dict[str, dict[str, int | str]]) -> None:
    """Write (and fsync) the manifest of ``files``, signed with this user's key, into
    ``directory``."""
    table = dict(sorted(files.items()))
    body = {"format": 2, "files": table, "crc32": _table_crc(table), "hmac": sign(table)}
    path = directory / MANIFEST
    path.write_text(json.dumps(body, indent=1))
    fsync_file(path)


def read_manifest(directory: Path) -> dict[str, dict[str, int | str]] | None:
    """The file table of ``directory``'s manifest, ``None`` when it has none; raises
    :class:`CorruptCheckpointError` when the manifest itself is damaged."""
    body = _read_body(directory)
    return None if body is None else body["files"]


def _read_body(directory: Path) -> dict | None:
    path = directory / MANIFEST
    if not path.is_file():
        return None
    try:
        body = json.loads(path.read_text())
        intact = isinstance(body["files"], dict) and body["crc32"] == _table_crc(body["files"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        intact = False
    if not intact:
        raise CorruptCheckpointError(directory, [f"{path}: the manifest itself is damaged"])
    return body


def find_damage(
    directory: Path, share: tuple[int, int] = (0, 1), trust: bool = False
) -> list[str] | None:
    """What is wrong with ``directory``'s files, one line per file (``[]``: nothing), or
    ``None`` without a manifest (only with ``trust``). Unless ``trust``, the manifest must
    be signed with this user's key (else :class:`UntrustedCheckpointError`). Sizes are
    checked for every file; checksums only when every size is right, and with
    ``share=(i, n)`` only for every n-th file from the i-th (to split the reading between
    ranks)."""
    body = _read_body(directory)
    if body is None:
        if trust:
            return None
        raise UntrustedCheckpointError(
            directory, f"it has no {MANIFEST} (an older vidpar or another program wrote it)"
        )
    table = body["files"]
    if not trust:
        check_signature(directory, table, body.get("hmac"))
    damaged = []
    for name, entry in table.items():
        path = directory / name
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            damaged.append(f"{path} is missing")
            continue
        if size != entry["size"]:
            kind = "truncated" if size < entry["size"] else "grown"
            damaged.append(f"{path} is {kind}: {size} bytes, the save wrote {entry['size']}")
    if damaged:
        return damaged
    index, count = share
    names = sorted(table)[index::count]
    sums = _checksums(directory, names)
    return [
        f"{directory / name} has other contents than the save wrote (CRC-32 {got['crc32']}, "
        f"recorded {table[name]['crc32']})"
        for name, got in zip(names, sums, strict=True)
        if any(got[kind] != table[name].get(kind, got[kind]) for kind in got)
    ]


def verify(directory: Path, warn: bool = True, trust: bool = False) -> None:
    """Raise :class:`CorruptCheckpointError` naming every damaged file of ``directory``,
    and :class:`UntrustedCheckpointError` unless its manifest is signed with this user's
    key or ``trust``; a trusted one without a manifest (an older vidpar's checkpoint) logs
    a warning (``warn``) instead. A directory this process verified before is checked
    again only if a file's size, modification time or inode changed since."""
    directory = Path(directory).resolve()
    signature = _signature(directory)
    if signature is not None and _VERIFIED.get(directory) in (
        (signature, False),
        (signature, trust),
    ):
        return
    damaged = find_damage(directory, trust=trust)
    if damaged is None:
        if warn:
            warn_unverified(directory)
        return
    if damaged:
        raise CorruptCheckpointError(directory, damaged)
    _VERIFIED[directory] = (signature, trust)


#: Directories verified, by their stat facts and whether they were trusted unsigned.
_VERIFIED: dict[Path, tuple] = {}
_WARNED: set[Path] = set()


def _signature(directory: Path) -> tuple | None:
    """The stat facts of the manifest and every file it names (``None`` if one is missing)."""
    try:
        names = [MANIFEST, *sorted(read_manifest(directory) or {})]
        stats = [(directory / name).stat() for name in names]
    except (OSError, CorruptCheckpointError):
        return None
    return tuple((s.st_size, s.st_mtime_ns, s.st_ino) for s in stats)


def warn_unverified(directory: Path) -> None:
    """Say (once per directory and process) that ``directory`` cannot be checked."""
    if directory in _WARNED:
        return
    _WARNED.add(directory)
    logger.warning(
        "vidpar: %s has no %s (written by an older vidpar): loading it without checking its files",
        directory,
        MANIFEST,
    )


def _table_crc(table: dict) -> str:
    return f"{zlib.crc32(json.dumps(table, sort_keys=True).encode()):08x}"


def _checksums(directory: Path, names: list[str]) -> list[dict[str, str]]:
    """:func:`_digests` of each file, in parallel threads when there is much to read."""
    paths = [directory / name for name in names]
    if len(paths) < 2 or sum(p.stat().st_size for p in paths) < _PARALLEL_BYTES:
        return [_digests(p) for p in paths]
    workers = min(len(paths), 8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(_digests, paths))
