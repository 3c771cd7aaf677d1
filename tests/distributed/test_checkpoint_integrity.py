"""Checkpoint integrity: a damaged or truncated shard is named before anything loads it
(resume, vidpar-generate, VideoGenerator, export, load_sharded), a checkpoint without a
manifest loads (with a warning) only when trusted, and a save refuses non-finite weights."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from hydra import compose, initialize_config_dir

from lightning_models import TINY_DIT
from vidpar.cli.hydra_setup import UserError, build_layout
from vidpar.cli.validation import check_before_launch
from vidpar.cli.validation_generate import find_checkpoint
from vidpar.distributed import checkpoint_integrity as integrity
from vidpar.distributed import checkpoint_store as store
from vidpar.distributed.checkpoint import (
    CorruptCheckpointError,
    NonFiniteWeightsError,
    UntrustedCheckpointError,
    _written_files,
    load_sharded,
    save_sharded,
)
from vidpar.distributed.full_weights import export_full_checkpoint
from vidpar.lightning import VideoDiffusionModule
from vidpar.pipelines import VideoGenerator
from vidpar.resources import CONFIG_DIR

WEIGHT = "model.model.blocks.0.self_attn.qkv.weight"


def module(seed: int = 0) -> VideoDiffusionModule:
    torch.manual_seed(seed)
    net = VideoDiffusionModule(
        dit=TINY_DIT,
        ema_decay=0.9,
        num_sample_videos=0,
        seed=seed,
        class_names=["a", "b", "c", "d"],
        video_shape=[3, 2, 8, 8],
    )
    net.configure_model()
    return net


def write(path: Path, net: VideoDiffusionModule, step: int = 0) -> Path:
    save_sharded(path, net, [], {"hyper_parameters": dict(net.hparams), "global_step": step})
    return store.resolve(path)


@pytest.fixture
def ckpt(tmp_path) -> Path:
    """A real checkpoint (one process) at ``<tmp>/run/checkpoints/last.ckpt``."""
    path = tmp_path / "run" / "checkpoints" / "last.ckpt"
    write(path, module())
    return path


def shard_of(path: Path, key: str) -> tuple[Path, int, int]:
    """The file holding ``key`` and its bytes' offset and length there."""
    version = store.resolve(path)
    metadata = dcp.FileSystemReader(str(version)).read_metadata()
    for index, info in metadata.storage_data.items():
        if index.fqn == key:
            return version / info.relative_path, info.offset, info.length
    raise KeyError(key)


def scribble(path: Path, key: str = WEIGHT, nbytes: int = 4096) -> Path:
    """Overwrite up to ``nbytes`` of the stored bytes of weight ``key`` (size unchanged)."""
    shard, offset, length = shard_of(path, key)
    with open(shard, "r+b") as f:
        f.seek(offset)
        f.write(os.urandom(min(nbytes, length)))
    return shard


def compose_train(*overrides: str):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=["output_dir=/tmp/vidpar-compose", *overrides])


def test_the_manifest_records_every_file_and_a_good_checkpoint_verifies(ckpt):
    version = store.resolve(ckpt)
    table = integrity.read_manifest(version)
    assert set(table) == {".metadata", "__0_0.distcp", "trainer_state.pt"}
    for name, entry in table.items():
        assert entry["size"] == (version / name).stat().st_size
        assert entry["crc32"] == integrity.crc32_of(version / name)
    integrity.verify(version)
    assert integrity.find_damage(version) == []


def test_garbage_in_a_weight_is_named_by_every_reader(ckpt, tmp_path):
    shard = scribble(ckpt)
    named = rf"{shard} has other contents than the save wrote"
    with pytest.raises(CorruptCheckpointError, match=named):
        integrity.verify(ckpt)
    with pytest.raises(CorruptCheckpointError, match=named):
        load_sharded(ckpt, module(), [])
    with pytest.raises(CorruptCheckpointError, match=named):
        export_full_checkpoint(ckpt, tmp_path / "out.safetensors")
    # vidpar-generate: found, then refused in the main process, before any worker starts
    # (an error from a worker would arrive as the Executor's RemoteError).
    for given in (None, str(ckpt)):
        with pytest.raises(UserError, match=named):
            find_checkpoint(given, str(tmp_path))
    with pytest.raises(CorruptCheckpointError, match=named) as err:
        VideoGenerator.from_checkpoint(ckpt, devices="cpu")
    assert type(err.value) is CorruptCheckpointError
    assert not (store.resolve(ckpt) / "model.safetensors").exists()
    # vidpar-train resume: refused by the checks before launch.
    conf = compose_train(f"ckpt_path={ckpt}")
    with pytest.raises(UserError, match=named):
        check_before_launch(conf, build_layout(conf.parallel))


def test_a_truncated_shard_is_named_from_its_size(ckpt):
    shard, _, _ = shard_of(ckpt, WEIGHT)
    size = shard.stat().st_size
    os.truncate(shard, size // 2)
    message = rf"{shard} is truncated: {size // 2} bytes, the save wrote {size}"
    with pytest.raises(CorruptCheckpointError, match=message):
        integrity.verify(ckpt)
    with pytest.raises(CorruptCheckpointError, match=message):
        load_sharded(ckpt, module(), [])
    shard.unlink()
    with pytest.raises(CorruptCheckpointError, match=rf"{shard} is missing"):
        integrity.verify(ckpt)


def test_a_damaged_manifest_is_named(ckpt):
    manifest = store.resolve(ckpt) / integrity.MANIFEST
    body = json.loads(manifest.read_text())
    body["files"]["__0_0.distcp"]["crc32"] = "00000000"
    manifest.write_text(json.dumps(body))
    with pytest.raises(CorruptCheckpointError, match="the manifest itself is damaged"):
        integrity.verify(ckpt)
    manifest.write_text("{not json")
    with pytest.raises(CorruptCheckpointError, match=rf"{manifest}: the manifest itself"):
        load_sharded(ckpt, module(), [])


def test_a_checkpoint_of_an_older_vidpar_is_refused_unless_trusted_then_warns(ckpt, caplog):
    (store.resolve(ckpt) / integrity.MANIFEST).unlink()
    net = module(seed=1)
    with pytest.raises(UntrustedCheckpointError, match=r"has no vidpar_manifest\.json"):
        load_sharded(ckpt, net, [])
    with caplog.at_level(logging.WARNING):
        load_sharded(ckpt, net, [], trust=True)
    assert any("has no vidpar_manifest.json" in r.getMessage() for r in caplog.records)
    assert torch.equal(
        net.state_dict()["model.blocks.0.self_attn.qkv.weight"],
        module().state_dict()["model.blocks.0.self_attn.qkv.weight"],
    )


def test_verification_is_redone_when_a_file_changes(ckpt):
    integrity.verify(ckpt)
    integrity.verify(ckpt)  # remembered
    scribble(ckpt)
    with pytest.raises(CorruptCheckpointError):
        integrity.verify(ckpt)


def test_a_save_of_non_finite_weights_is_refused_and_the_good_checkpoint_stays(ckpt):
    good = store.resolve(ckpt)
    net = module()
    with torch.no_grad():
        net.model.blocks[0].self_attn.qkv.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteWeightsError, match=r"Refusing to save .*rank\(s\) \[0\]") as e:
        write(ckpt, net, step=5)
    assert "model.blocks.0.self_attn.qkv.weight" in str(e.value)
    assert store.resolve(ckpt) == good and store.versions(ckpt) == [good]
    assert [p.name for p in ckpt.parent.iterdir() if ".partial-" in p.name] == []
    integrity.verify(good)


def test_vidpar_generate_names_the_damaged_file_and_exits_2(ckpt, tmp_path):
    shard = scribble(ckpt)
    result = subprocess.run(
        [sys.executable, "-m", "vidpar.cli.generate", "search_dir=run", "hydra.run.dir=gen"],
        cwd=tmp_path,
        env={**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert f"{shard.resolve()} has other contents than the save wrote" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_written_files_are_read_back_when_the_save_returns_no_storage_data(tmp_path):
    """torch 2.11's ``dcp.save`` returns its metadata without ``storage_data``."""
    metadata = dcp.save({"w": torch.ones(3), "b": torch.zeros(2)}, checkpoint_id=tmp_path)
    files = _written_files(metadata, tmp_path)
    assert files and all((tmp_path / name).is_file() for name in files)
    assert _written_files(dataclasses.replace(metadata, storage_data=None), tmp_path) == files
