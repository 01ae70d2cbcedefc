"""Synthetic shapes: random coloured ellipses, rectangles and triangles on noisy backgrounds, with instance masks.

Deterministic per (seed, index): the same picture and masks on every machine, process and call. For tests and
demos of pre-training (images) and of fine-tuning (images + instance masks).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

import numpy as np
from PIL import Image, ImageDraw
from ..errors import ParameterError

SHAPE_KINDS = ("ellipse", "rectangle", "triangle")


@dataclass
class ShapesSample:
    """One picture: image (S,S,3) uint8, labels (S,S) uint8 (0 = background, k = k-th shape as drawn, what is
    visible of it after later shapes cover it), and the kind of each shape."""

    image: np.ndarray
    labels: np.ndarray
    kinds: List[str]

    @property
    def masks(self) -> np.ndarray:
        """Instance masks (N,S,S) bool, one per shape still visible, in drawing order."""
        ids = [k for k in range(1, len(self.kinds) + 1) if (self.labels == k).any()]
        if not ids:
            return np.zeros((0, *self.labels.shape), dtype=bool)
        return np.stack([self.labels == k for k in ids])


def render_shapes(index: int, seed: int = 0, size: int = 224, min_shapes: int = 1, max_shapes: int = 4
                  ) -> ShapesSample:
    """Draw picture `index` of the set `seed`: 1-4 shapes of random kind, colour, size, position and rotation
    over a noisy colour gradient."""
    if size < 8:
        raise ParameterError(f"synthetic shapes: size must be at least 8 pixels, got {size}")
    if not 1 <= min_shapes <= max_shapes or max_shapes > 255:
        raise ParameterError(f"synthetic shapes: expected 1 <= min_shapes <= max_shapes <= 255, got {min_shapes}, "
                             f"{max_shapes}")
    rng = np.random.default_rng([seed, index])
    # background: a linear gradient between two colours in a random direction, plus Gaussian noise
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    t = np.clip(0.5 + (xx - 0.5) * np.cos(angle) + (yy - 0.5) * np.sin(angle), 0, 1)[..., None]
    sigma = rng.uniform(2, 10)
    img = (1 - t) * c0 + t * c1 + sigma * rng.standard_normal((size, size, 3), dtype=np.float32)
    labels = np.zeros((size, size), dtype=np.uint8)
    kinds = []
    for k in range(1, int(rng.integers(min_shapes, max_shapes + 1)) + 1):
        kind = SHAPE_KINDS[int(rng.integers(len(SHAPE_KINDS)))]
        cx, cy = rng.uniform(0.15, 0.85, 2) * size
        r = rng.uniform(0.08, 0.25) * size
        layer = Image.new("L", (size, size), 0)
        draw = ImageDraw.Draw(layer)
        if kind == "ellipse":
            rx, ry = r, r * rng.uniform(0.5, 1.0)
            draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=255)
        else:
            if kind == "rectangle":
                w, h = r, r * rng.uniform(0.4, 1.0)
                corners = np.array([[-w, -h], [w, -h], [w, h], [-w, h]])
            else:
                a = rng.uniform(0, 2 * np.pi) + np.array([0, 2.1, 4.2]) + rng.uniform(-0.4, 0.4, 3)
                corners = r * np.stack([np.cos(a), np.sin(a)], 1)
            rot = rng.uniform(0, np.pi)
            R = np.array([[np.cos(rot), -np.sin(rot)], [np.sin(rot), np.cos(rot)]])
            pts = corners @ R.T + [cx, cy]
            draw.polygon([tuple(p) for p in pts], fill=255)
        inside = np.asarray(layer) > 0
        colour = rng.uniform(0, 255, 3)
        img[inside] = colour + rng.normal(0, 3, (int(inside.sum()), 3))  # a little texture, not one flat colour
        labels[inside] = k
        kinds.append(kind)
    return ShapesSample(np.clip(np.rint(img), 0, 255).astype(np.uint8), labels, kinds)


class SyntheticShapes:
    """A fixed set of n synthetic pictures (`render_shapes(i, seed, size)` for i < n); items are ShapesSample."""

    def __init__(self, n: int, size: int = 224, seed: int = 0, cache: int = 4096) -> None:
        if n < 1:
            raise ParameterError(f"synthetic shapes: the set needs at least 1 image, got {n}")
        self.n, self.size, self.seed = n, size, seed
        self._cache: dict = {} if cache >= n else None  # rendered once when the whole set fits (224 px: 150 kB each)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> ShapesSample:
        if not 0 <= index < self.n:
            raise IndexError(f"synthetic shapes: index {index} outside 0..{self.n - 1}")
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        sample = render_shapes(index, self.seed, self.size)
        if self._cache is not None:
            self._cache[index] = sample
        return sample

    def load(self, index: int) -> np.ndarray:
        """The image alone, (S,S,3) uint8 (the image-source interface of samvit.train.data)."""
        return self[index].image

    def name(self, index: int) -> str:
        return f"synthetic:{self.seed}:{index}"
