"""Pictures of masks: the image with masks blended in, prompt points and the box drawn over it."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np


def draw_overlay(rgb: np.ndarray, masks: Sequence[np.ndarray], points: Sequence[Sequence[float]] = (),
                 box: Optional[Sequence[float]] = None) -> np.ndarray:
    """The HxWx3 uint8 image with each (H,W) bool mask blended in a colour (half opacity; one mask: blue, several:
    fixed random colours), points (x, y[, label]) as green (1) / red (0) dots, the box (x0, y0, x1, y1) in yellow."""
    from PIL import Image, ImageDraw

    out = rgb.astype(np.float32)
    rng = np.random.default_rng(0)
    for m in masks:
        color = np.array([30, 144, 255], np.float32) if len(masks) == 1 else rng.integers(40, 256, 3).astype(np.float32)
        out[m] = 0.5 * out[m] + 0.5 * color
    img = Image.fromarray(out.round().astype(np.uint8))
    draw = ImageDraw.Draw(img)
    r = max(3, round(max(rgb.shape[:2]) / 150))
    for pt in points:
        fill = (0, 200, 0) if (len(pt) < 3 or pt[2] == 1) else (220, 0, 0)
        draw.ellipse([pt[0] - r, pt[1] - r, pt[0] + r, pt[1] + r], fill=fill, outline=(255, 255, 255))
    if box:
        draw.rectangle(list(box), outline=(255, 200, 0), width=max(1, r // 2))
    return np.asarray(img)
