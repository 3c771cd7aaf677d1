"""The latents folder format: write, read back, pad prompts, fall back without dataset.json,
refuse what does not fit, and the datamodule's splits."""

from __future__ import annotations

import json

import pytest
import torch

from vidpar.data import LatentsDataModule, LatentsDataset, write_latents_folder


def samples(n: int = 3, channels: int = 4, dim: int = 8):
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn((n, channels, 2, 4, 6), generator=gen)
    prompts = [torch.randn(2 + i, dim, generator=gen) for i in range(n)]
    return latents, prompts


def test_a_folder_round_trips_with_prompts_padded(tmp_path):
    latents, prompts = samples()
    negative = [torch.randn(1, 8) for _ in range(3)]
    write_latents_folder(
        tmp_path / "d", latents.to(torch.bfloat16), prompts, negative, prompts=["a", "b", "c"]
    )
    index = json.loads((tmp_path / "d" / "dataset.json").read_text())
    assert index["latent_shape"] == [4, 2, 4, 6] and index["text_len"] == 4
    assert [s["file"] for s in index["samples"]] == [f"00000{i}.safetensors" for i in range(3)]
    ds = LatentsDataset(tmp_path / "d")
    assert len(ds) == 3 and ds.prompts == ["a", "b", "c"] and ds.latent_shape == (4, 2, 4, 6)
    for i in range(3):
        item = ds[i]
        assert item["index"] == i and item["latents"].dtype == torch.float32
        assert torch.equal(item["latents"], latents[i].to(torch.bfloat16).float())
        assert item["prompt_embeds"].shape == (4, 8)
        assert torch.equal(item["prompt_embeds"][: 2 + i], prompts[i])
        assert not item["prompt_embeds"][2 + i :].any()  # zero padding, as Wan pads
        assert torch.equal(item["negative_prompt_embeds"][:1], negative[i])
    assert "3 samples, latents [4, 2, 4, 6], text 4×8" in repr(ds)


def test_without_dataset_json_every_file_is_a_sample_and_negatives_are_zeros(tmp_path):
    latents, prompts = samples()
    write_latents_folder(tmp_path, latents, prompts)
    (tmp_path / "dataset.json").unlink()
    ds = LatentsDataset(tmp_path)
    assert len(ds) == 3 and ds.text_len == 4 and ds.text_dim == 8  # read from the headers
    assert torch.equal(ds[2]["latents"], latents[2])
    assert ds[0]["negative_prompt_embeds"].shape == (4, 8)
    assert not ds[0]["negative_prompt_embeds"].any()


def test_what_does_not_fit_is_refused_clearly(tmp_path):
    latents, prompts = samples()
    with pytest.raises(ValueError, match="same positive number of each"):
        write_latents_folder(tmp_path / "a", latents, prompts[:2])
    with pytest.raises(ValueError, match="latents differ in shape"):
        write_latents_folder(tmp_path / "a", [latents[0], latents[1, :, :1]], prompts[:2])
    with pytest.raises(ValueError, match="text embeddings differ in width"):
        write_latents_folder(tmp_path / "a", latents[:2], [prompts[0], torch.randn(2, 5)])
    write_latents_folder(tmp_path / "b", latents, prompts)
    with pytest.raises(FileExistsError, match="is not empty"):
        write_latents_folder(tmp_path / "b", latents, prompts)
    with pytest.raises(FileNotFoundError, match=r"latents folder .* does not exist"):
        LatentsDataset(tmp_path / "nope")
    (tmp_path / "b" / "dataset.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="is not a vidpar-latents index"):
        LatentsDataset(tmp_path / "b")


def test_the_datamodule_holds_out_the_last_samples(tmp_path):
    latents, prompts = samples(n=5)
    write_latents_folder(tmp_path, latents, prompts)
    dm = LatentsDataModule(str(tmp_path), batch_size=2, num_val=2, shuffle=False)
    assert dm.video_shape == (4, 2, 4, 6)
    assert dm.hparams.latents_path == str(tmp_path) and "path" not in dm.hparams  # the model's
    assert len(dm.train_set) == 3 and len(dm.val_set) == 2
    assert torch.equal(dm.val_set[0]["latents"], latents[3])
    batch = next(iter(dm.train_dataloader()))
    assert batch["latents"].shape == (2, 4, 2, 4, 6) and batch["index"].tolist() == [0, 1]
    assert batch["prompt_embeds"].shape == (2, 6, 8)  # the folder's longest prompt
    assert LatentsDataModule(str(tmp_path)).val_dataloader() == []
    with pytest.raises(ValueError, match=r"num_val must be in \[0, 4\] for 5 samples"):
        LatentsDataModule(str(tmp_path), num_val=5)


@pytest.mark.parametrize("entry", ["../x.safetensors", "/etc/hostname", "a/../../x", ""])
def test_dataset_json_entries_outside_the_folder_are_refused_by_name(tmp_path, entry):
    write_latents_folder(tmp_path / "d", *samples())
    (tmp_path / "x.safetensors").write_bytes((tmp_path / "d" / "000000.safetensors").read_bytes())
    index_file = tmp_path / "d" / "dataset.json"
    index = json.loads(index_file.read_text())
    index["samples"][1]["file"] = entry
    index_file.write_text(json.dumps(index))
    with pytest.raises(ValueError, match=rf"lists the sample file {entry!r}, which is not inside"):
        LatentsDataset(tmp_path / "d")
