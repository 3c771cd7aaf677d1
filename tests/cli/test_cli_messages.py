"""What vidpar's commands say: a missing checkpoint is called missing, and a resumed run
finds the state of vidpar's checkpoint callback even with another ``trainer.max_steps``."""

from __future__ import annotations

import pytest

from vidpar.cli.hydra_setup import UserError
from vidpar.cli.validation_generate import find_checkpoint
from vidpar.lightning import VidParModelCheckpoint


def test_a_missing_checkpoint_is_called_missing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"checkpoint=nope\.safetensors: there is no such file"):
        find_checkpoint("nope.safetensors", "outputs")


def test_the_checkpoint_callback_state_key_does_not_depend_on_the_save_interval(tmp_path):
    # vidpar-train derives every_n_train_steps from trainer.max_steps: a resumed run with
    # more steps must find the callback's state (else Lightning warns that the callback
    # "used to create the checkpoint" is missing).
    first = VidParModelCheckpoint(dirpath=tmp_path / "a", every_n_train_steps=10)
    resumed = VidParModelCheckpoint(dirpath=tmp_path / "b", every_n_train_steps=20)
    assert first.state_key == resumed.state_key
    assert first.state_key != VidParModelCheckpoint(monitor="loss").state_key
