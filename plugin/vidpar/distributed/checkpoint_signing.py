"""Checkpoint signatures: only checkpoints this user's vidpar wrote are read unasked.

DCP's ``.metadata`` and the optimizer entries in its data files are pickles, which run
code when read. So a save signs its manifest (every file's size, CRC-32 and SHA-256) with
an HMAC-SHA256 keyed by a secret of the user's own, ``$XDG_CONFIG_HOME/vidpar/
checkpoint.key`` (default ``~/.config/vidpar/checkpoint.key``; created 0600 at the first
save), and a load checks the signature before any file is unpickled: a checkpoint written
by someone else (or with a rewritten manifest) is refused unless the caller trusts it
(``trust_checkpoint=true`` on the command line, ``trust=True`` in Python). The safe way
to share weights is the exported ``.safetensors`` file
(:func:`vidpar.lightning.export_full_checkpoint`), which holds no code.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from pathlib import Path

KEY_FILE = "checkpoint.key"

SHARE_SAFELY = (
    "To share weights safely, export them to one .safetensors file "
    "(vidpar.lightning.export_full_checkpoint(CKPT, OUT)) and pass that file "
    "(checkpoint=OUT.safetensors)."
)


class UntrustedCheckpointError(ValueError):
    """A checkpoint's manifest is not signed with this user's key: refused unread."""

    def __init__(self, directory: Path, reason: str) -> None:
        self.directory = directory
        self.reason = reason
        super().__init__(
            f"Refusing to read the checkpoint {directory}: {reason}. Its DCP files hold "
            "pickles, which can run code, so vidpar reads only checkpoints signed with your "
            f"key ({key_path()}). If you trust whoever wrote it, pass trust_checkpoint=true "
            f"(Python: trust=True). {SHARE_SAFELY}"
        )

    def __reduce__(self):
        return (type(self), (self.directory, self.reason))


def key_path() -> Path:
    """Where this user's signing key lives."""
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "vidpar" / KEY_FILE


def signing_key() -> bytes:
    """This user's key, created (0600, atomically: concurrent first uses agree) if missing."""
    path = key_path()
    if path.is_file():
        return _read_key(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    partial = path.with_name(f".{KEY_FILE}.{secrets.token_hex(4)}")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, secrets.token_hex(32).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(partial, path)  # fails if another process created it first: theirs wins
    except FileExistsError:
        pass
    finally:
        partial.unlink()
    return _read_key(path)


def _read_key(path: Path) -> bytes:
    try:
        key = bytes.fromhex(path.read_text().strip())
    except (ValueError, UnicodeDecodeError):
        key = b""
    if len(key) < 16:
        raise ValueError(
            f"{path} is not a vidpar checkpoint key (64 hex digits). Restore it, or delete it "
            "to make a new one (checkpoints signed with the old key then need "
            "trust_checkpoint=true)."
        )
    return key


def sign(table: dict) -> str:
    """The HMAC-SHA256 (hex) of a manifest's file table under this user's key."""
    body = json.dumps(table, sort_keys=True).encode()
    return hmac.new(signing_key(), body, hashlib.sha256).hexdigest()


def check_signature(directory: Path, table: dict, signature: object) -> None:
    """Raise :class:`UntrustedCheckpointError` unless ``signature`` signs ``table``, with
    every file recorded by its SHA-256 (so that the signature covers the contents)."""
    if not isinstance(signature, str):
        raise UntrustedCheckpointError(directory, "its manifest is not signed")
    if not all(isinstance(entry, dict) and "sha256" in entry for entry in table.values()):
        raise UntrustedCheckpointError(directory, "its manifest records no SHA-256 of a file")
    if not hmac.compare_digest(signature, sign(table)):
        raise UntrustedCheckpointError(
            directory, "its manifest is signed with another key (another user or machine)"
        )
