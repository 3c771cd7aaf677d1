"""MovingShapes: a synthetic, class-conditional video dataset made on the fly.

Every clip shows one shape in its own colour gliding over a dark background and
bouncing off the frame's edges. The label is the shape, so class conditioning is
visible at a glance. Item ``i`` is a pure function of ``(seed, i)``: nothing is
downloaded or stored, and any worker or rank can make any item.

:func:`fit_shape` scores a generated clip against the dataset: how well each frame's
foreground matches the class's shape, and where that shape sits.
"""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

#: Shape names, in label order.
SHAPES: tuple[str, ...] = (
    "square",
    "circle",
    "triangle",
    "cross",
    "diamond",
    "ring",
    "x",
    "frame",
)
#: RGB colour of each shape, in [0, 1].
COLOURS: tuple[tuple[float, float, float], ...] = (
    (0.95, 0.20, 0.20),  # red
    (0.25, 0.90, 0.30),  # green
    (0.25, 0.45, 1.00),  # blue
    (1.00, 0.90, 0.20),  # yellow
    (0.95, 0.30, 0.95),  # magenta
    (0.20, 0.95, 0.95),  # cyan
    (1.00, 0.55, 0.10),  # orange
    (0.95, 0.95, 0.95),  # white
)
#: Background colour in [0, 1] (dark, slightly blue).
BACKGROUND: tuple[float, float, float] = (0.04, 0.04, 0.08)
#: Sub-pixel samples per axis; the coverage of each pixel gives soft edges and smooth motion.
_SUPERSAMPLE = 4
#: Shape radius as a fraction of the frame's shorter side: drawn from this range.
RADIUS_RANGE: tuple[float, float] = (0.2, 0.26)


def shape_mask(shape: int, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Boolean mask of shape ``shape`` at offsets ``(dx, dy)`` from its centre, measured in
    units of its radius (the shape fits in the unit disc; y points down)."""
    ax, ay = np.abs(dx), np.abs(dy)
    name = SHAPES[shape]
    if name == "square":
        return np.maximum(ax, ay) <= 0.75
    if name == "circle":
        return dx * dx + dy * dy <= 0.9
    if name == "triangle":  # apex up, base down
        return (dy <= 0.7) & (ax <= (dy + 1.0) * 0.55)
    if name == "cross":
        return ((ax <= 0.3) & (ay <= 0.95)) | ((ay <= 0.3) & (ax <= 0.95))
    if name == "diamond":
        return ax + ay <= 1.0
    if name == "ring":
        r2 = dx * dx + dy * dy
        return (r2 <= 1.0) & (r2 >= 0.3)
    if name == "x":
        return (np.abs(ax - ay) <= 0.35) & (np.maximum(ax, ay) <= 0.85)
    if name == "frame":
        m = np.maximum(ax, ay)
        return (m <= 0.85) & (m >= 0.45)
    raise ValueError(f"unknown shape index {shape}")


def bounce(position: np.ndarray, low: float, high: float) -> np.ndarray:
    """Fold free-flight positions into ``[low, high]`` as if reflected by walls there."""
    span = high - low
    if span <= 0:
        return np.full_like(position, low)
    u = np.mod(position - low, 2.0 * span)
    return low + span - np.abs(u - span)


class MovingShapesDataset(Dataset):
    """Clips of one coloured shape moving and bouncing over a dark background.

    Items are dicts ``{"video": float32 [3, T, H, W] in [-1, 1], "label": int, "index": int}``;
    the label is the shape index (see :data:`SHAPES`), in ``[0, num_classes)``, and the index
    is the item's own (for per-sample seeding of noise in training). The shape's size,
    start position and velocity are random per item, drawn from ``(seed, index)`` only, so
    item ``i`` is the same in every process. ``min_speed`` and ``max_speed`` are in pixels
    per frame (scaled with the frame for sizes other than 16).
    """

    def __init__(
        self,
        num_samples: int,
        num_frames: int = 8,
        height: int = 16,
        width: int = 16,
        num_classes: int = 4,
        seed: int = 0,
        min_speed: float = 0.7,
        max_speed: float = 1.6,
    ) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        if num_frames < 1 or height < 4 or width < 4:
            raise ValueError(
                f"need num_frames >= 1 and height, width >= 4, got "
                f"num_frames={num_frames}, height={height}, width={width}"
            )
        if not 1 <= num_classes <= len(SHAPES):
            raise ValueError(
                f"num_classes must be in [1, {len(SHAPES)}] (one class per shape: "
                f"{', '.join(SHAPES)}), got {num_classes}"
            )
        if not 0 <= min_speed <= max_speed:
            raise ValueError(f"need 0 <= min_speed <= max_speed, got {min_speed}, {max_speed}")
        self.num_samples = num_samples
        self.num_frames = num_frames
        self.height = height
        self.width = width
        self.num_classes = num_classes
        self.seed = seed
        self.min_speed = min_speed
        self.max_speed = max_speed
        # Sub-pixel sample offsets within one pixel, shared by every item.
        offsets = (np.arange(_SUPERSAMPLE) + 0.5) / _SUPERSAMPLE
        self._ys = (np.arange(height)[:, None] + offsets[None, :]).reshape(-1)
        self._xs = (np.arange(width)[:, None] + offsets[None, :]).reshape(-1)

    @property
    def shape_names(self) -> tuple[str, ...]:
        """The name of each class, in label order."""
        return SHAPES[: self.num_classes]

    def __len__(self) -> int:
        return self.num_samples

    def params(self, index: int) -> dict[str, float | int]:
        """The random draws behind item ``index``: label, radius, start and velocity."""
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} is outside a dataset of {self.num_samples}")
        rng = np.random.default_rng([self.seed, index])
        label = int(rng.integers(self.num_classes))
        scale = min(self.height, self.width) / 16.0
        radius = float(rng.uniform(*RADIUS_RANGE) * min(self.height, self.width))
        x0 = float(rng.uniform(radius, self.width - radius))
        y0 = float(rng.uniform(radius, self.height - radius))
        speed = float(rng.uniform(self.min_speed, self.max_speed) * scale)
        angle = float(rng.uniform(0.0, 2.0 * np.pi))
        return {
            "label": label,
            "radius": radius,
            "x0": x0,
            "y0": y0,
            "vx": speed * np.cos(angle),
            "vy": speed * np.sin(angle),
        }

    def trajectory(self, index: int) -> np.ndarray:
        """Centre ``(x, y)`` in pixels of item ``index``'s shape in every frame: ``[T, 2]``."""
        return self._centres(self.params(index))

    def _centres(self, p: dict[str, float | int]) -> np.ndarray:
        t = np.arange(self.num_frames, dtype=np.float64)
        r = p["radius"]
        x = bounce(p["x0"] + p["vx"] * t, r, self.width - r)
        y = bounce(p["y0"] + p["vy"] * t, r, self.height - r)
        return np.stack([x, y], axis=1)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | int]:
        index = int(index)
        p = self.params(index)
        centres = self._centres(p)
        r = p["radius"]
        s = _SUPERSAMPLE
        dx = (self._xs[None, None, :] - centres[:, 0, None, None]) / r  # [T, 1, W*s]
        dy = (self._ys[None, :, None] - centres[:, 1, None, None]) / r  # [T, H*s, 1]
        mask = shape_mask(p["label"], dx, dy)  # [T, H*s, W*s]
        # Each pixel's covered sub-pixels, counted exactly in small integers (rows, then
        # columns: contiguous sums, several times faster than a float mean over both).
        hits = mask.astype(np.uint8).reshape(-1, s, self.width * s).sum(axis=1, dtype=np.uint8)
        hits = hits.reshape(self.num_frames, self.height, self.width, s)
        cover = hits.sum(axis=3, dtype=np.uint8) / (s * s)
        fg = np.asarray(COLOURS[p["label"]], dtype=np.float64)
        bg = np.asarray(BACKGROUND, dtype=np.float64)
        rgb = bg[:, None, None, None] + (fg - bg)[:, None, None, None] * cover[None]
        video = torch.from_numpy(rgb * 2.0 - 1.0).float()  # [3, T, H, W] in [-1, 1]
        return {"video": video, "label": p["label"], "index": index}

    def __repr__(self) -> str:
        return (
            f"MovingShapesDataset(num_samples={self.num_samples}, num_frames={self.num_frames}, "
            f"height={self.height}, width={self.width}, num_classes={self.num_classes}, "
            f"seed={self.seed})"
        )


class ShapeFit(NamedTuple):
    """:func:`fit_shape`'s answer, per frame."""

    #: ``[T]``: the best IoU of the frame's foreground with the class's shape.
    iou: torch.Tensor
    #: ``[T, 2]``: ``(x, y)`` centre of that best-matching shape, in pixels.
    centre: torch.Tensor


def fit_shape(video: torch.Tensor, label: int) -> ShapeFit:
    """How much each frame of ``video`` (``[3, T, H, W]`` in [-1, 1]) shows shape ``label``.

    The foreground is every pixel closer to the class's colour than to the background; it
    is compared with the shape drawn at every centre (on a half-pixel grid, or coarser for
    frames over 32 pixels) and at three radii of the dataset's range. Clips of the dataset
    score about 0.92; noise or scattered speckles score well under 0.5.
    """
    if video.dim() != 4 or video.shape[0] != 3:
        raise ValueError(f"video must be [3, T, H, W], got {tuple(video.shape)}")
    _, frames, height, width = video.shape
    rgb = (video.detach().double().clamp(-1, 1) + 1) / 2
    fg = torch.tensor(COLOURS[label], dtype=torch.float64).view(3, 1, 1, 1)
    bg = torch.tensor(BACKGROUND, dtype=torch.float64).view(3, 1, 1, 1)
    mask = ((rgb - fg).norm(dim=0) < (rgb - bg).norm(dim=0)).reshape(frames, -1).double()
    shapes, centres = _shape_bank(label, height, width)
    inter = mask @ shapes.T  # [T, M]
    union = mask.sum(1, keepdim=True) + shapes.sum(1) - inter
    iou, best = (inter / union.clamp_min(1)).max(1)
    return ShapeFit(iou.float(), centres[best].float())


@lru_cache(maxsize=32)
def _shape_bank(label: int, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks ``[M, H·W]`` of shape ``label`` at every candidate centre and radius, and the
    centres ``[M, 2]``."""
    side = min(height, width)
    step = max(0.5, side / 32)
    offsets = (np.arange(_SUPERSAMPLE) + 0.5) / _SUPERSAMPLE
    ys = (np.arange(height)[:, None] + offsets[None, :]).reshape(-1)
    xs = (np.arange(width)[:, None] + offsets[None, :]).reshape(-1)
    masks, centres = [], []
    for radius in np.linspace(*RADIUS_RANGE, 3) * side:
        for cy in np.arange(radius, height - radius + 1e-9, step):
            for cx in np.arange(radius, width - radius + 1e-9, step):
                drawn = shape_mask(label, (xs[None, :] - cx) / radius, (ys[:, None] - cy) / radius)
                cover = drawn.reshape(height, _SUPERSAMPLE, width, _SUPERSAMPLE).mean(axis=(1, 3))
                masks.append((cover > 0.5).reshape(-1))
                centres.append((cx, cy))
    return (
        torch.from_numpy(np.array(masks, dtype=np.float64)),
        torch.tensor(centres, dtype=torch.float64),
    )
