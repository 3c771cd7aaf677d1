"""Trust: a pickle planted in a checkpoint (``trainer_state.pt`` or DCP's ``.metadata``) never
runs, on resume, vidpar-generate or export: checkpoints are signed with the user's key and
refused otherwise (unless trusted), and the trainer state loads with ``weights_only=True``.
Generation writes nothing beside a checkpoint; a failed save names what is kept."""

from __future__ import annotations

import json
import os
import pickle
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from lightning_models import TINY_DIT
from vidpar.cli.hydra_setup import UserError, build_layout
from vidpar.cli.validation import check_before_launch
from vidpar.distributed import checkpoint_integrity as integrity
from vidpar.distributed import checkpoint_signing as signing
from vidpar.distributed import checkpoint_store as store
from vidpar.distributed.checkpoint import (
    CheckpointWriteError,
    CorruptCheckpointError,
    UntrustedCheckpointError,
    load_sharded,
    save_sharded,
)
from vidpar.distributed.full_weights import export_full_checkpoint
from vidpar.lightning import VideoDiffusionModule
from vidpar.pipelines.dit_weights import checkpoint_weights
from vidpar.resources import CONFIG_DIR


class Planted:
    """Unpickling it writes ``marker``: proof that a pickle ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "ran"))


def module(seed: int = 0) -> VideoDiffusionModule:
    torch.manual_seed(seed)
    net = VideoDiffusionModule(
        dit=TINY_DIT,
        num_sample_videos=0,
        class_names=["a", "b", "c", "d"],
        video_shape=[3, 2, 8, 8],
    )
    net.configure_model()
    return net


@pytest.fixture
def ckpt(tmp_path) -> Path:
    """A real checkpoint of this user at ``<tmp>/run/checkpoints/last.ckpt``."""
    path = tmp_path / "run" / "checkpoints" / "last.ckpt"
    net = module()
    save_sharded(path, net, [], {"hyper_parameters": dict(net.hparams), "global_step": 0})
    return path


def plant(ckpt: Path, name: str, marker: Path, resign: str) -> None:
    """Replace file ``name`` of the checkpoint by a pickle that writes ``marker``; then
    ``resign``: ``"none"`` (manifest as saved), ``"manifest"`` (sizes, checksums and the
    manifest's own CRC rewritten, as anyone can) or ``"unsigned"`` (no manifest at all)."""
    version = store.resolve(ckpt)
    if name == store.TRAINER_STATE:
        torch.save({"hyper_parameters": Planted(marker), "global_step": 0}, version / name)
    else:
        (version / name).write_bytes(pickle.dumps(Planted(marker)))
    manifest = version / integrity.MANIFEST
    if resign == "unsigned":
        manifest.unlink()
    elif resign == "manifest":
        body = json.loads(manifest.read_text())
        body["files"] |= integrity.describe(version, [name])
        body["crc32"] = integrity._table_crc(body["files"])
        manifest.write_text(json.dumps(body))


def compose_train(*overrides: str):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=["output_dir=/tmp/vidpar-compose", *overrides])


@pytest.mark.parametrize("resign", ["none", "manifest", "unsigned"])
@pytest.mark.parametrize("name", [store.TRAINER_STATE, store.DCP_METADATA])
def test_a_planted_pickle_never_runs_on_resume_or_export(ckpt, tmp_path, name, resign):
    marker = tmp_path / "marker"
    plant(ckpt, name, marker, resign)
    refused = CorruptCheckpointError if resign == "none" else UntrustedCheckpointError
    with pytest.raises(refused):
        load_sharded(ckpt, module(), [])
    with pytest.raises(refused):
        export_full_checkpoint(ckpt, tmp_path / "out.safetensors")
    with pytest.raises(refused):
        checkpoint_weights(ckpt)
    conf = compose_train("parallel=single", f"ckpt_path={ckpt}")
    with pytest.raises(UserError, match=r"Refusing to read|is damaged"):
        check_before_launch(conf, build_layout(conf.parallel))
    assert not marker.exists()


def test_a_trusted_trainer_state_is_still_read_without_unpickling(ckpt, tmp_path):
    marker = tmp_path / "marker"
    plant(ckpt, store.TRAINER_STATE, marker, "manifest")
    with pytest.raises(ValueError, match="does not unpickle"):
        load_sharded(ckpt, module(), [], trust=True)
    with pytest.raises(ValueError, match="does not unpickle"):
        export_full_checkpoint(ckpt, tmp_path / "out.safetensors", trust=True)
    conf = compose_train("parallel=single", f"ckpt_path={ckpt}", "trust_checkpoint=true")
    with pytest.raises(UserError, match="does not unpickle"):
        check_before_launch(conf, build_layout(conf.parallel))
    assert not marker.exists()


def test_vidpar_generate_refuses_a_planted_metadata_pickle_and_says_how_to_share(ckpt, tmp_path):
    marker = tmp_path / "marker"
    plant(ckpt, store.DCP_METADATA, marker, "manifest")
    result = subprocess.run(
        [sys.executable, "-m", "vidpar.cli.generate", f"checkpoint={ckpt}", "hydra.run.dir=gen"],
        cwd=tmp_path,
        env={**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Refusing to read the checkpoint" in result.stderr
    assert "export_full_checkpoint" in result.stderr and "trust_checkpoint=true" in result.stderr
    assert not marker.exists()


RUN = ("hydra.run.dir=resume", "logger=none")


def test_vidpar_train_refuses_to_resume_from_a_planted_trainer_state(ckpt, tmp_path):
    marker = tmp_path / "marker"
    plant(ckpt, store.TRAINER_STATE, marker, "manifest")
    result = subprocess.run(
        [sys.executable, "-m", "vidpar.cli.train", "parallel=single", f"ckpt_path={ckpt}", *RUN],
        cwd=tmp_path,
        env={**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Refusing to read the checkpoint" in result.stderr and "Traceback" not in result.stderr
    assert not marker.exists()


def test_the_key_is_private_and_another_users_checkpoint_needs_trust(ckpt, monkeypatch, tmp_path):
    key = signing.key_path()
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    trainer_state = load_sharded(ckpt, module(1), [])  # this user's: loads
    assert trainer_state["hyper_parameters"]["video_shape"] == [3, 2, 8, 8]
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "other-user"))
    with pytest.raises(UntrustedCheckpointError, match="signed with another key"):
        load_sharded(ckpt, module(1), [])
    assert stat.S_IMODE(signing.key_path().stat().st_mode) == 0o600  # theirs, created
    net = module(1)
    load_sharded(ckpt, net, [], trust=True)
    assert torch.equal(
        net.model.blocks[0].self_attn.qkv.weight, module().model.blocks[0].self_attn.qkv.weight
    )


def test_generation_writes_nothing_beside_a_read_only_checkpoint(ckpt, monkeypatch, tmp_path):
    """Tests run as root, where 0555 does not stop writes: every file under the run's
    folder is compared before and after instead."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder = ckpt.parent
    for path in (folder, *folder.rglob("*")):
        if path.is_dir() and not path.is_symlink():
            path.chmod(0o555)

    def snapshot() -> dict:
        return {str(p): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in folder.rglob("*")}

    try:
        before = snapshot()
        weights = checkpoint_weights(ckpt)
        assert checkpoint_weights(ckpt) == weights  # exported once
        assert snapshot() == before
        assert weights.parent == tmp_path / "cache" / "vidpar" / "exports"
    finally:
        for path in (folder, *folder.rglob("*")):
            if path.is_dir() and not path.is_symlink():
                path.chmod(0o755)


SAVE_UNDER_A_FILE_SIZE_LIMIT = """
import resource, signal, sys
from pathlib import Path
import torch
sys.path[:0] = [{tests!r}, {support!r}]
from test_checkpoint_trust import module
from vidpar.distributed.checkpoint import CheckpointWriteError, save_sharded
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
net = module(1)
optimizer = torch.optim.SGD(net.parameters(), lr=0.1)  # its param_groups: a pickled entry
try:
    save_sharded(Path({ckpt!r}), net, [optimizer], {{"global_step": 1}})
except CheckpointWriteError as err:
    print("vidpar:", err)
"""


def test_a_save_that_runs_out_of_space_names_the_checkpoint_kept(ckpt, tmp_path):
    """A file-size limit (RLIMIT_FSIZE) fails the save's writes as a full disk would (both
    kinds: a tensor's bytes, and torch's zip writer for a pickled entry, whose failure DCP
    reports as a RuntimeError "unexpected pos")."""
    kept = store.resolve(ckpt)
    script = SAVE_UNDER_A_FILE_SIZE_LIMIT.format(
        tests=str(Path(__file__).parent),
        support=str(Path(__file__).parents[1] / "support"),
        ckpt=str(ckpt),
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("vidpar:")]
    assert len(lines) == 1, result.stdout[-2000:] + result.stderr[-2000:]
    assert f"could not write the checkpoint {ckpt}" in lines[0]
    assert f"the previous checkpoint {kept} is kept" in lines[0]
    assert store.resolve(ckpt) == kept and store.versions(ckpt) == [kept]
    assert [p.name for p in ckpt.parent.iterdir() if ".partial-" in p.name] == []
    load_sharded(ckpt, module(1), [])
    assert CheckpointWriteError.__mro__[1] is OSError


def test_lightning_objects_in_the_trainer_state_become_plain_values(tmp_path, caplog):
    import dataclasses
    import enum

    import numpy as np
    from lightning.pytorch.utilities.parsing import AttributeDict
    from omegaconf import OmegaConf

    from vidpar.distributed.checkpoint_state import load_trainer_state, save_trainer_state

    class Mode(enum.Enum):
        FAST = "fast"

    @dataclasses.dataclass
    class Sizes:
        depth: int = 2

    state = {
        "hyper_parameters": AttributeDict(
            dit=Sizes(), path=Path("/data"), mode=Mode.FAST, conf=OmegaConf.create({"a": [1, 2]})
        ),
        "callbacks": {"ModelCheckpoint{'monitor': None}": {"best_model_score": torch.tensor(1.5)}},
        "loops": {"steps": (np.int64(3), {4, 5}), "opaque": object()},
    }
    save_trainer_state(state, tmp_path / "state.pt")
    loaded = load_trainer_state(tmp_path / "state.pt")  # weights_only=True
    assert loaded["hyper_parameters"] == {
        "dit": {"depth": 2},
        "path": "/data",
        "mode": "fast",
        "conf": {"a": [1, 2]},
    }
    assert type(loaded["hyper_parameters"]) is dict
    assert loaded["callbacks"]["ModelCheckpoint{'monitor': None}"]["best_model_score"] == 1.5
    assert loaded["loops"]["steps"] == (3, [4, 5])
    assert loaded["loops"]["opaque"].startswith("<object object")
    assert "trainer_state['loops']['opaque'] (a object) as its string" in caplog.text
