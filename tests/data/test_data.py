"""MovingShapes: determinism, value ranges, labels, motion, and that classes differ."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from vidpar.data import COLOURS, SHAPES, MovingShapesDataset, fit_shape
from vidpar.data.moving_shapes import BACKGROUND, bounce, shape_mask


def foreground(video: torch.Tensor) -> torch.Tensor:
    """Per-pixel shape coverage ``[T, H, W]`` in [0, 1], from the distance to the background."""
    bg = torch.tensor(BACKGROUND).view(3, 1, 1, 1) * 2 - 1
    return (video - bg).abs().amax(0) / (video - bg).abs().amax().clamp_min(1e-6)


def centre_of_mass(video: torch.Tensor) -> torch.Tensor:
    """``[T, 2]`` (x, y) centre of each frame's foreground, in pixel units (centres at +0.5)."""
    w = foreground(video).double()
    _, h, wd = w.shape
    ys = torch.arange(h, dtype=torch.float64) + 0.5
    xs = torch.arange(wd, dtype=torch.float64) + 0.5
    mass = w.sum((1, 2))
    return torch.stack([(w.sum(1) * xs).sum(1) / mass, (w.sum(2) * ys).sum(1) / mass], 1)


def test_items_are_deterministic_from_seed_and_index():
    a = MovingShapesDataset(32, seed=3)
    b = MovingShapesDataset(32, seed=3)
    c = MovingShapesDataset(32, seed=4)
    for i in (0, 7, 31):
        assert torch.equal(a[i]["video"], b[i]["video"]) and a[i]["label"] == b[i]["label"]
        assert torch.equal(a[i]["video"], a[i]["video"])
    assert not torch.equal(a[0]["video"], a[1]["video"])
    assert any(not torch.equal(a[i]["video"], c[i]["video"]) for i in range(4))
    # Access order does not matter: item 5 is the same made first or last.
    fresh = MovingShapesDataset(32, seed=3)
    assert torch.equal(fresh[5]["video"], a[5]["video"])


def test_shape_dtype_range_and_labels():
    ds = MovingShapesDataset(64, num_classes=6, seed=1)
    assert len(ds) == 64 and ds.shape_names == SHAPES[:6]
    labels = []
    for i in range(len(ds)):
        item = ds[i]
        v = item["video"]
        assert v.shape == (3, 8, 16, 16) and v.dtype == torch.float32
        assert v.min() >= -1 and v.max() <= 1
        assert v.min() < -0.8 and v.max() > 0.5  # a dark background and a bright shape
        assert isinstance(item["label"], int) and item["index"] == i
        labels.append(item["label"])
    assert set(labels) == set(range(6))


def test_other_sizes_and_collation():
    ds = MovingShapesDataset(6, num_frames=5, height=24, width=32, num_classes=8, seed=2)
    assert ds[0]["video"].shape == (3, 5, 24, 32)
    batch = next(iter(DataLoader(ds, batch_size=4)))
    assert batch["video"].shape == (4, 3, 5, 24, 32)
    assert batch["label"].dtype == torch.int64 and batch["label"].shape == (4,)
    assert batch["index"].tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_samples": 0},
        {"num_samples": 4, "num_classes": 0},
        {"num_samples": 4, "num_classes": len(SHAPES) + 1},
        {"num_samples": 4, "height": 2},
        {"num_samples": 4, "min_speed": 2.0, "max_speed": 1.0},
    ],
)
def test_bad_arguments_fail(kwargs):
    with pytest.raises(ValueError):
        MovingShapesDataset(**kwargs)


def test_index_out_of_range():
    ds = MovingShapesDataset(3)
    with pytest.raises(IndexError):
        ds[3]


def test_shapes_move_along_their_trajectory():
    ds = MovingShapesDataset(24, num_classes=8, seed=5)
    total_motion = []
    for i in range(len(ds)):
        video = ds[i]["video"]
        traj = torch.from_numpy(ds.trajectory(i))
        r = ds.params(i)["radius"]
        # The whole shape stays inside the frame: the centre is kept r away from edges.
        assert traj.min() >= r - 1e-9 and traj[:, 0].max() <= ds.width - r + 1e-9
        # Every frame differs from the next.
        for t in range(ds.num_frames - 1):
            assert (video[:, t] - video[:, t + 1]).abs().max() > 0.1
        com = centre_of_mass(video)
        # The centre of mass moves with the shape's centre (a constant offset per shape).
        moved_com = com - com[0]
        moved_traj = traj - traj[0]
        assert torch.allclose(moved_com, moved_traj, atol=0.35), (i, moved_com, moved_traj)
        total_motion.append((com[1:] - com[:-1]).norm(dim=1).sum().item())
    # min_speed 0.7 px/frame over 7 steps.
    assert min(total_motion) > 0.7 * 7 * 0.8


@pytest.mark.parametrize("size", [(8, 16, 16), (3, 12, 20)], ids=["16x16", "12x20"])
def test_each_pixel_is_its_sub_pixels_coverage_of_the_shape(size):
    """Every pixel blends background and colour by the share of its 4 × 4 sub-pixel samples
    inside the shape (the mean of the supersampled mask), exactly."""
    frames, height, width = size
    ds = MovingShapesDataset(20, num_frames=frames, height=height, width=width, num_classes=8)
    s = 4
    for index in range(20):
        item, p = ds[index], ds.params(index)
        centres, r = ds.trajectory(index), p["radius"]
        ys = (np.arange(height * s) + 0.5) / s
        xs = (np.arange(width * s) + 0.5) / s
        dx = (xs[None, None, :] - centres[:, 0, None, None]) / r
        dy = (ys[None, :, None] - centres[:, 1, None, None]) / r
        mask = shape_mask(p["label"], dx, dy).reshape(frames, height, s, width, s)
        cover = mask.mean(axis=(2, 4))
        fg, bg = np.asarray(COLOURS[p["label"]]), np.asarray(BACKGROUND)
        want = bg[:, None, None, None] + (fg - bg)[:, None, None, None] * cover[None]
        assert torch.equal(item["video"], torch.from_numpy(want * 2.0 - 1.0).float())


def test_bounce_reflects_off_the_walls():
    p = np.array([-1.0, 0.0, 2.0, 5.0, 11.0, 13.0, 21.0])
    got = bounce(p, 2.0, 10.0)
    np.testing.assert_allclose(got, [5.0, 4.0, 2.0, 5.0, 9.0, 7.0, 5.0])
    assert got.min() >= 2 and got.max() <= 10


def test_classes_look_different():
    # Shapes: every pair of masks differs on a good part of the unit disc.
    g = np.linspace(-1, 1, 101)
    dx, dy = np.meshgrid(g, g)
    masks = [shape_mask(s, dx, dy) for s in range(len(SHAPES))]
    for a in range(len(SHAPES)):
        assert masks[a].mean() > 0.2
        for b in range(a):
            assert (masks[a] != masks[b]).mean() > 0.1, (SHAPES[a], SHAPES[b])
    # Colours: the brightest pixel of each clip has its class's colour.
    ds = MovingShapesDataset(48, num_classes=8, seed=6)
    seen = set()
    for i in range(len(ds)):
        item = ds[i]
        v = item["video"]
        fg = foreground(v)
        t, y, x = np.unravel_index(int(fg.argmax()), fg.shape)
        colour = (v[:, t, y, x] + 1) / 2
        nearest = int((torch.tensor(COLOURS) - colour).norm(dim=1).argmin())
        assert nearest == item["label"]
        seen.add(item["label"])
    assert len(seen) == 8
    # And any two distinct colours are far apart.
    c = torch.tensor(COLOURS)
    dist = torch.cdist(c, c) + torch.eye(len(c)) * 10
    assert dist.min() > 0.3


def test_datamodule_loaders():
    from vidpar.data import MovingShapesDataModule

    dm = MovingShapesDataModule(num_train=20, num_val=6, batch_size=4, num_classes=3, seed=1)
    assert dm.video_shape == (3, 8, 16, 16) and dm.num_classes == 3
    train = list(dm.train_dataloader())
    assert len(train) == 5 and train[0]["video"].shape == (4, 3, 8, 16, 16)
    val = list(dm.val_dataloader())
    assert [len(b["label"]) for b in val] == [4, 2]
    assert torch.equal(val[0]["video"], next(iter(dm.val_dataloader()))["video"])
    # Train and validation clips come from different seeds.
    assert not torch.equal(dm.train_set[0]["video"], dm.val_set[0]["video"])


def test_data_and_pipelines_import_no_lightning_hydra_or_wandb():
    code = (
        "import sys, vidpar.data, vidpar.pipelines; "
        "bad = [m for m in ('lightning', 'pytorch_lightning', 'hydra', 'wandb') "
        "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_fit_shape_finds_the_drawn_shape_and_its_path():
    data = MovingShapesDataset(16, num_classes=8, seed=5)
    for i in range(16):
        item = data[i]
        fit = fit_shape(item["video"], item["label"])
        assert fit.iou.shape == (8,) and fit.centre.shape == (8, 2)
        assert fit.iou.mean() > 0.8, (i, fit.iou)
        assert (fit.centre.double() - torch.from_numpy(data.trajectory(i))).norm(dim=1).max() <= 1.1


def test_fit_shape_scores_noise_and_the_wrong_class_low():
    noise = torch.randn(3, 8, 16, 16, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    assert fit_shape(noise, 0).iou.mean() < 0.3
    blank = torch.tensor(BACKGROUND).view(3, 1, 1, 1).expand(3, 8, 16, 16) * 2 - 1
    assert fit_shape(blank, 1).iou.max() == 0
    square = MovingShapesDataset(64, num_classes=4, seed=0)
    item = next(square[i] for i in range(64) if square[i]["label"] == 0)
    assert fit_shape(item["video"], 1).iou.max() == 0  # red pixels are not the green circle
    with pytest.raises(ValueError, match=r"\[3, T, H, W\]"):
        fit_shape(item["video"][0], 0)
