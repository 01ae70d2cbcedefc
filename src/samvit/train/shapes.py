"""Synthetic shapes: random coloured ellipses, rectangles and triangles on noisy backgrounds, with instance masks;
and a shifted style (stars, rings and blobs, gradient-filled, over stripes or checks) to test transfer to another
distribution than the one trained on.

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
SHIFTED_KINDS = ("star", "ring", "blob")
STYLES = ("shapes", "shifted")


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
    _check_counts(size, min_shapes, max_shapes)
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
            draw.polygon(_placed(corners, rng.uniform(0, np.pi), cx, cy), fill=255)
        inside = np.asarray(layer) > 0
        colour = rng.uniform(0, 255, 3)
        img[inside] = colour + rng.normal(0, 3, (int(inside.sum()), 3))  # a little texture, not one flat colour
        labels[inside] = k
        kinds.append(kind)
    return ShapesSample(np.clip(np.rint(img), 0, 255).astype(np.uint8), labels, kinds)


def _check_counts(size: int, min_shapes: int, max_shapes: int) -> None:
    if size < 8:
        raise ParameterError(f"synthetic shapes: size must be at least 8 pixels, got {size}")
    if not 1 <= min_shapes <= max_shapes or max_shapes > 255:
        raise ParameterError(f"synthetic shapes: expected 1 <= min_shapes <= max_shapes <= 255, got {min_shapes}, "
                             f"{max_shapes}")


def _placed(corners: np.ndarray, rot: float, cx: float, cy: float) -> list:
    """Polygon corners (K,2) around the origin, rotated by rot and moved to (cx, cy): a list of (x, y) for PIL."""
    R = np.array([[np.cos(rot), -np.sin(rot)], [np.sin(rot), np.cos(rot)]])
    return [tuple(p) for p in corners @ R.T + [cx, cy]]


def render_shifted(index: int, seed: int = 0, size: int = 224, min_shapes: int = 2, max_shapes: int = 6
                   ) -> ShapesSample:
    """Picture `index` of the shifted set `seed`: what render_shapes never draws. 2-6 stars, rings (with a hole)
    and smooth blobs, smaller (radius 6-18% of the side, render_shapes: 8-25%), each filled with a two-colour
    gradient, over stripes or a checkerboard of two colours (render_shapes: a smooth gradient)."""
    _check_counts(size, min_shapes, max_shapes)
    rng = np.random.default_rng([seed, index, 1])  # not render_shapes' stream for the same (seed, index)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    period = rng.uniform(0.04, 0.15) * size
    if rng.random() < 0.5:  # stripes at a random angle
        angle = rng.uniform(0, np.pi)
        t = (np.floor((xx * np.cos(angle) + yy * np.sin(angle)) / period) % 2)[..., None]
    else:  # a checkerboard
        t = ((np.floor(xx / period) + np.floor(yy / period)) % 2)[..., None]
    img = (1 - t) * c0 + t * c1 + rng.uniform(2, 10) * rng.standard_normal((size, size, 3), dtype=np.float32)
    labels = np.zeros((size, size), dtype=np.uint8)
    kinds = []
    for k in range(1, int(rng.integers(min_shapes, max_shapes + 1)) + 1):
        kind = SHIFTED_KINDS[int(rng.integers(len(SHIFTED_KINDS)))]
        cx, cy = rng.uniform(0.12, 0.88, 2) * size
        r = rng.uniform(0.06, 0.18) * size
        layer = Image.new("L", (size, size), 0)
        draw = ImageDraw.Draw(layer)
        if kind == "ring":
            rx, ry = r, r * rng.uniform(0.6, 1.0)
            hole = rng.uniform(0.4, 0.65)
            draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=255)
            draw.ellipse([cx - rx * hole, cy - ry * hole, cx + rx * hole, cy + ry * hole], fill=0)
        else:
            if kind == "star":
                points = int(rng.integers(5, 8))
                a = np.arange(2 * points) * np.pi / points
                radius = np.where(np.arange(2 * points) % 2 == 0, r, r * rng.uniform(0.35, 0.6))
            else:  # a blob: a radius that varies smoothly with the angle (harmonics 2-4)
                a = np.linspace(0, 2 * np.pi, 48, endpoint=False)
                radius = r * (1 + sum(rng.uniform(-0.18, 0.18) * np.cos(h * a + rng.uniform(0, 2 * np.pi))
                                      for h in (2, 3, 4)))
            draw.polygon(_placed(radius[:, None] * np.stack([np.cos(a), np.sin(a)], 1), rng.uniform(0, np.pi),
                                 cx, cy), fill=255)
        inside = np.asarray(layer) > 0
        if not inside.any():
            continue
        f0, f1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        g_angle = rng.uniform(0, 2 * np.pi)
        u = np.clip(0.5 + ((xx - cx) * np.cos(g_angle) + (yy - cy) * np.sin(g_angle)) / (2 * r), 0, 1)[inside]
        img[inside] = (1 - u)[:, None] * f0 + u[:, None] * f1 + rng.normal(0, 3, (int(inside.sum()), 3))
        labels[inside] = len(kinds) + 1
        kinds.append(kind)
    return ShapesSample(np.clip(np.rint(img), 0, 255).astype(np.uint8), labels, kinds)


class SyntheticShapes:
    """A fixed set of n synthetic pictures (`render_shapes(i, seed, size)` for i < n, or render_shifted with
    style='shifted'); items are ShapesSample."""

    def __init__(self, n: int, size: int = 224, seed: int = 0, cache: int = 4096, style: str = "shapes") -> None:
        if n < 1:
            raise ParameterError(f"synthetic shapes: the set needs at least 1 image, got {n}")
        if style not in STYLES:
            raise ParameterError(f"synthetic shapes: style {style!r} (expected one of {', '.join(STYLES)})")
        self.n, self.size, self.seed, self.style = n, size, seed, style
        self._render = render_shapes if style == "shapes" else render_shifted
        self._cache: dict = {} if cache >= n else None  # rendered once when the whole set fits (224 px: 150 kB each)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> ShapesSample:
        if not 0 <= index < self.n:
            raise IndexError(f"synthetic shapes: index {index} outside 0..{self.n - 1}")
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        sample = self._render(index, self.seed, self.size)
        if self._cache is not None:
            self._cache[index] = sample
        return sample

    def load(self, index: int) -> np.ndarray:
        """The image alone, (S,S,3) uint8 (the image-source interface of samvit.train.data)."""
        return self[index].image

    def name(self, index: int) -> str:
        return f"synthetic:{self.seed}:{index}" if self.style == "shapes" else f"shifted:{self.seed}:{index}"
