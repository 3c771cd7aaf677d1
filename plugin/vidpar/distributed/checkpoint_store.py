"""Where checkpoints live on disk: versions behind an atomically replaced pointer.

A checkpoint named ``NAME`` (``last.ckpt``, or a top-k name) in a directory ``D`` is::

    D/NAME                      symlink -> .NAME.v000007 (relative, in the same directory)
    D/.NAME.v000006/            older complete versions (``keep_last`` of them in all)
    D/.NAME.v000007/            the current version: DCP files, trainer_state.pt, manifest
    D/.NAME.partial-<random>    a save or a removal in progress (or interrupted): garbage

The invariants, which hold at every instant, whatever is killed when:

* a directory named ``.NAME.v<seq>`` is complete: a save writes into a ``.partial-``
  staging directory, its writers fsync every file, the directory is fsynced, and only then
  is it renamed to its version name (``rename`` is atomic); a version that is deleted is
  first renamed back to a ``.partial-`` name;
* ``NAME`` moves from one complete version to the next by ``rename`` of a new symlink over
  it (atomic), fsynced before the old version is removed.

So a reader that resolves ``NAME`` once (:func:`resolve`) holds a complete version, the
old or the new, never a mix. Where ``NAME`` is missing or broken, :func:`resolve` takes the
newest complete version beside it (that only happens while an older vidpar's plain
``NAME`` directory is adopted as a version, one rename before the pointer exists).
Partials left by interrupted saves are removed at the first save into a directory, with
one log line naming them. One run writes a directory at a time. Readers need nothing but
the path: Lightning, DCP and ``torch.load`` follow the symlink like a directory.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

#: The file holding the rest of the training state (Lightning's loops, callbacks, ...).
TRAINER_STATE = "trainer_state.pt"
#: DCP's metadata file, written last by DCP.
DCP_METADATA = ".metadata"

_PARTIAL = ".partial-"
_SWEPT: set[Path] = set()


def holds_checkpoint(directory: Path) -> bool:
    """Whether ``directory`` itself holds a finished checkpoint's files (no resolution)."""
    return (directory / TRAINER_STATE).is_file() and (directory / DCP_METADATA).is_file()


def resolve(path: str | os.PathLike) -> Path | None:
    """The complete checkpoint directory ``path`` stands for (its current version, or a
    plain checkpoint directory of an older vidpar), or ``None`` when there is none."""
    path = Path(path)
    target = path.resolve()
    if holds_checkpoint(target):
        return target
    for version in reversed(versions(path)):  # pointer missing or broken
        if holds_checkpoint(version):
            return version
    return None


def is_complete(path: str | os.PathLike) -> bool:
    """Whether ``path`` resolves to a finished vidpar checkpoint."""
    return resolve(path) is not None


def versions(path: str | os.PathLike) -> list[Path]:
    """The version directories of checkpoint ``path``, oldest first (absolute paths)."""
    path = Path(path)
    directory = path.parent.resolve()
    prefix = f".{path.name}.v"
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    found = [
        (int(name[len(prefix) :]), directory / name)
        for name in names
        if name.startswith(prefix) and name[len(prefix) :].isdigit()
    ]
    return [version for _, version in sorted(found)]


def prepare(path: Path) -> Path:
    """Before a save to ``path`` (one process): remove stale partials of the directory at
    its first save in this process, adopt an older vidpar's plain checkpoint directory at
    ``path`` as a version, and return a new empty staging directory beside ``path``."""
    directory = path.parent
    directory.mkdir(parents=True, exist_ok=True)
    if directory.resolve() not in _SWEPT:
        sweep_partials(directory)
        _SWEPT.add(directory.resolve())
    if path.is_dir() and not path.is_symlink():
        _adopt(path)
    return Path(tempfile.mkdtemp(prefix=f".{path.name}{_PARTIAL}", dir=directory))


def _install_next_version(path: Path, source: Path) -> Path:
    """Rename ``source`` to the version after ``path``'s newest and point ``path`` at it."""
    existing = versions(path)
    seq = int(existing[-1].name.rsplit(".v", 1)[1]) + 1 if existing else 1
    version = path.parent / f".{path.name}.v{seq:06d}"
    os.rename(source, version)
    fsync_directory(path.parent)
    _point(path, version)
    return version


def commit(path: Path, staging: Path, keep_last: int = 1) -> Path:
    """Make the finished ``staging`` directory the current version of ``path`` (its files
    already fsynced by their writers) and keep ``keep_last`` versions; returns the version."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be at least 1, got {keep_last}")
    fsync_directory(staging)
    version = _install_next_version(path, staging)
    current = path.resolve()
    kept = set(versions(path)[-keep_last:]) | {current}
    for old in versions(path):
        if old not in kept:
            _delete(old)
    return version


def discard(staging: Path) -> None:
    """Remove a staging directory whose save failed."""
    if staging.exists():
        shutil.rmtree(staging, ignore_errors=True)


def remove(path: str | os.PathLike) -> None:
    """Delete checkpoint ``path``: its versions (the current one last, so that until then
    ``path`` still resolves to it), then the pointer; a plain directory or file at
    ``path`` too."""
    path = Path(path)
    own = versions(path)
    current = path.resolve()
    for version in own:
        if version != current:
            _delete(version)
    if current in own:
        _delete(current)
    if path.is_symlink():
        path.unlink()
    elif path.is_dir():
        _delete(path)
    elif path.exists():
        path.unlink()


def sweep_partials(directory: Path) -> list[Path]:
    """Remove what interrupted saves and removals left in ``directory`` (one log line)."""
    stale = sorted(p for p in directory.iterdir() if p.name.startswith(".") and _PARTIAL in p.name)
    for partial in stale:
        if partial.is_dir() and not partial.is_symlink():
            shutil.rmtree(partial, ignore_errors=True)
        else:
            partial.unlink(missing_ok=True)
    if stale:
        logger.warning(
            "vidpar: removed %d partial checkpoint file(s) left by interrupted saves in %s: %s",
            len(stale),
            directory,
            ", ".join(p.name for p in stale),
        )
    return stale


def fsync_file(path: Path) -> None:
    """Flush a written file's data to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_directory(directory: Path) -> None:
    """Flush a directory's entries (names created, renamed or removed in it)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:  # filesystems that cannot sync a directory say so this way
        if err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _point(path: Path, version: Path) -> None:
    """Atomically make ``path`` a symlink to ``version`` (a sibling)."""
    link = path.parent / f".{path.name}{_PARTIAL}{secrets.token_hex(4)}.link"
    os.symlink(version.name, link)
    os.replace(link, path)
    fsync_directory(path.parent)


def _adopt(path: Path) -> None:
    """An older vidpar's plain directory at ``path``: a complete one becomes a version
    (``path`` is missing for one rename: :func:`resolve` finds the version meanwhile), an
    incomplete one is removed."""
    if not holds_checkpoint(path):
        _delete(path)
        return
    _install_next_version(path, path)


def _delete(directory: Path) -> None:
    """Remove a directory: first renamed to a partial name (atomic), so no half-deleted
    directory ever carries a version's or a checkpoint's name."""
    trash = directory.parent / f".{directory.name.lstrip('.')}{_PARTIAL}{secrets.token_hex(4)}"
    os.rename(directory, trash)
    shutil.rmtree(trash)
