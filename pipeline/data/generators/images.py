"""``images``: procedurally drawn shapes with labels, as an arrays file (``.npz``).

Notable features:
- Four classes: 0 circle, 1 square, 2 triangle (pointing up), 3 cross (a plus sign with arms a
  quarter of its size wide). Each shape has a random size (11-20 px), position (fully inside),
  bright fill colour (channels 0.55-1) on a dark background (channels 0-0.4), plus Gaussian pixel
  noise (std 0.04): learnable, not a lookup of one pixel.
- Keys: ``images`` (N, 3, 32, 32) float32 in [0, 1], ``label`` (N,) int64, ``split`` (N,) unicode
  train/val/test (70/15/15), ``sample_id`` (N,) int64.
- Deterministic by seed; drawn with numpy masks (no imaging library).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from pipeline.data.base import SPLIT_NAMES, assign_splits
from pipeline.registry import register_generator

log = logging.getLogger(__name__)

CLASSES = ("circle", "square", "triangle", "cross")
IMAGE_SIZE = 32
DEFAULT_N = 3000
NOISE_STD = 0.04
SPLIT_FRACTIONS = (0.70, 0.15, 0.15)


def shape_mask(kind: int, *, size: int, top: int, left: int, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """Boolean (H, W) mask of one shape whose bounding box is ``size`` px at (top, left)."""
    yy, xx = np.mgrid[0:image_size, 0:image_size].astype(np.float64)
    # Pixel centres relative to the box, in [0, size)
    y = yy + 0.5 - top
    x = xx + 0.5 - left
    inside = (y >= 0) & (y < size) & (x >= 0) & (x < size)
    if kind == 0:  # circle inscribed in the box
        r = size / 2.0
        return ((y - r) ** 2 + (x - r) ** 2) <= r * r
    if kind == 1:  # square = the box
        return inside
    if kind == 2:  # triangle: apex at the top centre, base along the bottom edge
        half_width = 0.5 * size * (y / size)
        return inside & (np.abs(x - size / 2.0) <= half_width)
    if kind == 3:  # plus sign, arms size/4 wide
        arm = size / 8.0
        c = size / 2.0
        return inside & ((np.abs(x - c) <= arm) | (np.abs(y - c) <= arm))
    raise ValueError(f"unknown shape class {kind}")


def draw(*, n: int, seed: int, noise: float = NOISE_STD) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(CLASSES), n).astype(np.int64)
    images = np.empty((n, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    for i in range(n):
        size = int(rng.integers(11, 21))
        top = int(rng.integers(0, IMAGE_SIZE - size + 1))
        left = int(rng.integers(0, IMAGE_SIZE - size + 1))
        # Dark background, bright shape, both of random hue: a shape is a brightness pattern whatever its
        # colour, which a small ViT trained from scratch on a few thousand images can learn (with arbitrary
        # colour pairs it stays near chance on this budget).
        background = rng.uniform(0.0, 0.4, 3)
        colour = rng.uniform(0.55, 1.0, 3)
        mask = shape_mask(int(labels[i]), size=size, top=top, left=left)
        img = np.where(mask[None], colour[:, None, None], background[:, None, None])
        img = img + rng.normal(0.0, noise, img.shape)
        images[i] = np.clip(img, 0.0, 1.0)
    split = np.asarray(SPLIT_NAMES, dtype="<U5")[assign_splits(n, SPLIT_FRACTIONS, rng=rng)]
    return {"images": images, "label": labels, "split": split, "sample_id": np.arange(n, dtype=np.int64)}


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Like ``np.savez`` but byte-identical for identical arrays: ``np.savez`` stamps each member with
    the current time, which would change the data fingerprint (and so the cache key) on every run."""
    import zipfile

    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for key, arr in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with zf.open(info, "w", force_zip64=True) as fh:
                np.lib.format.write_array(fh, np.ascontiguousarray(arr), allow_pickle=False)


@register_generator("images")
def make_images(*, out: Path, n: int | None = None, seed: int = 0) -> Path:
    """Write ``n`` labelled shape images to ``out`` (``.npz``; see the module docstring)."""
    n = DEFAULT_N if n is None else int(n)
    if n < 3:
        from pipeline.errors import DataError

        raise DataError(f"images needs at least 3 samples (one per split); got n={n}")
    out = Path(out)
    if out.suffix != ".npz":
        out = out.with_suffix(".npz")  # np.savez would append it anyway; say so in the returned path
    out.parent.mkdir(parents=True, exist_ok=True)
    _write_npz(out, draw(n=n, seed=seed))
    log.info("wrote %d shape images to %s", n, out)
    return out
