"""The checkpoint store on a real filesystem: versions behind an atomically replaced pointer,
keep_last, removal, stale partials, checkpoints of an older vidpar."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from vidpar.distributed import checkpoint_store as store
from vidpar.distributed.checkpoint_store import DCP_METADATA, TRAINER_STATE


def staged(path: Path, content: str) -> Path:
    """A finished save's staging directory for ``path``, holding ``content``."""
    staging = store.prepare(path)
    for name in (TRAINER_STATE, DCP_METADATA, "__0_0.distcp"):
        (staging / name).write_text(content)
    return staging


def save(path: Path, content: str, keep_last: int = 1) -> Path:
    return store.commit(path, staged(path, content), keep_last)


def content(path: Path) -> str:
    resolved = store.resolve(path)
    assert resolved is not None
    texts = {(resolved / name).read_text() for name in (TRAINER_STATE, "__0_0.distcp")}
    assert len(texts) == 1, f"a mix of saves in {resolved}: {texts}"
    return texts.pop()


def test_each_save_is_a_new_version_and_the_name_points_at_the_newest(tmp_path):
    ckpt = tmp_path / "last.ckpt"
    assert store.resolve(ckpt) is None and not store.is_complete(ckpt)
    first = save(ckpt, "one")
    assert ckpt.is_symlink() and os.readlink(ckpt) == first.name == ".last.ckpt.v000001"
    assert content(ckpt) == "one" and store.is_complete(ckpt)
    second = save(ckpt, "two")
    assert second.name == ".last.ckpt.v000002" and content(ckpt) == "two"
    assert not first.exists()  # keep_last=1: the old version went after the switch
    assert sorted(p.name for p in tmp_path.iterdir()) == [".last.ckpt.v000002", "last.ckpt"]
    # Readers see a plain directory at the name.
    assert (ckpt / TRAINER_STATE).read_text() == "two"


def test_keep_last_keeps_that_many_versions(tmp_path):
    ckpt = tmp_path / "last.ckpt"
    for i in range(5):
        save(ckpt, f"save {i}", keep_last=3)
    assert [v.name[-2:] for v in store.versions(ckpt)] == ["03", "04", "05"]
    assert content(ckpt) == "save 4"
    with pytest.raises(ValueError, match="keep_last must be at least 1"):
        save(ckpt, "x", keep_last=0)


def test_a_version_newer_than_the_pointer_is_not_taken_and_is_pruned_later(tmp_path):
    """Killed after the rename to a version name, before the pointer moved: the old stays
    current; the next save prunes the stranded one."""
    ckpt = tmp_path / "last.ckpt"
    save(ckpt, "old")
    stranded = staged(ckpt, "stranded")
    os.rename(stranded, tmp_path / ".last.ckpt.v000002")
    assert content(ckpt) == "old"
    save(ckpt, "new")
    assert content(ckpt) == "new"
    assert [v.name for v in store.versions(ckpt)] == [".last.ckpt.v000003"]


def test_stale_partials_are_removed_at_the_first_save_with_one_line(tmp_path, caplog):
    ckpt = tmp_path / "last.ckpt"
    save(ckpt, "old")
    leftovers = [
        tmp_path / ".last.ckpt.partial-abc",  # an interrupted save's staging
        tmp_path / ".last.ckpt.partial-def.link",  # an interrupted pointer switch
        tmp_path / ".last.ckpt.v000001.partial-0a1b",  # an interrupted prune
    ]
    leftovers[0].mkdir()
    (leftovers[0] / "__0_0.distcp").write_text("half")
    os.symlink(".last.ckpt.v000001", leftovers[1])
    leftovers[2].mkdir()
    store._SWEPT.discard(tmp_path.resolve())  # a new run
    with caplog.at_level(logging.WARNING, logger="vidpar.distributed.checkpoint_store"):
        save(ckpt, "new")
    assert not any(p.exists() or p.is_symlink() for p in leftovers)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "removed 3 partial" in lines[0]
    assert all(p.name in lines[0] for p in leftovers)
    assert content(ckpt) == "new"


def test_removing_a_checkpoint_removes_its_versions_only(tmp_path):
    top = tmp_path / "epoch=0-step=2.ckpt"
    last = tmp_path / "last.ckpt"
    save(top, "top", keep_last=2)
    save(top, "top again", keep_last=2)
    save(last, "last")
    store.remove(top)
    assert not top.exists() and not top.is_symlink() and store.versions(top) == []
    assert content(last) == "last"
    # Lightning's save_last="link": last.ckpt a symlink to a top-k pointer.
    save(top, "linked")
    last.unlink()
    os.symlink(top.name, last)
    assert content(last) == "linked"
    store.remove(last)
    assert content(top) == "linked" and not last.is_symlink()


def test_an_older_vidpar_checkpoint_directory_loads_and_becomes_a_version(tmp_path):
    ckpt = tmp_path / "last.ckpt"
    ckpt.mkdir()
    for name in (TRAINER_STATE, DCP_METADATA, "__0_0.distcp"):
        (ckpt / name).write_text("legacy")
    assert store.resolve(ckpt) == ckpt.resolve() and content(ckpt) == "legacy"
    save(ckpt, "new", keep_last=2)
    assert ckpt.is_symlink() and content(ckpt) == "new"
    older = store.versions(ckpt)[0]
    assert (older / TRAINER_STATE).read_text() == "legacy"
    # The one instant of the adoption without a name: the newest version is found.
    ckpt.unlink()
    assert content(ckpt) == "new"


def test_an_incomplete_directory_never_resolves(tmp_path):
    ckpt = tmp_path / "last.ckpt"
    ckpt.mkdir()
    (ckpt / "__0_0.distcp").write_text("half written")
    assert store.resolve(ckpt) is None
    save(ckpt, "new")  # the broken plain directory is replaced
    assert content(ckpt) == "new" and len(store.versions(ckpt)) == 1
