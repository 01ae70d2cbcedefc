"""Prompt validation: points, labels, boxes and mask inputs, in original-image pixels (x right, y down)."""
from __future__ import annotations

from typing import Optional, Tuple, Union

import numpy as np
import torch

from ..errors import SamvitError

ArrayLike = Union[np.ndarray, torch.Tensor, list, tuple]


class PromptError(SamvitError, ValueError):
    """A prompt that cannot be used: wrong shape, outside the image, bad label or box."""


def as_tensor(x: ArrayLike, name: str, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """A numeric, finite tensor from an array-like prompt, or PromptError naming it."""
    try:
        t = torch.as_tensor(np.asarray(x) if isinstance(x, (list, tuple)) else x)
    except (TypeError, ValueError, RuntimeError) as e:
        raise PromptError(f"{name}: expected a numeric array, got {type(x).__name__} ({e})") from None
    if t.dtype == torch.bool or t.is_complex():
        raise PromptError(f"{name}: expected a numeric array, got dtype {t.dtype}")
    t = t.to(dtype) if dtype is not None else t
    if t.is_floating_point() and not torch.isfinite(t).all():
        raise PromptError(f"{name}: contains NaN or infinite values")
    return t


def check_points(coords: torch.Tensor, labels: torch.Tensor, image_size: Tuple[int, int],
                 allow_padding: bool) -> None:
    """(N,2) points (x, y) inside an (H, W) image, labels 1/0 (and -1 = padding when allowed)."""
    h, w = image_size
    valid = (0, 1, -1) if allow_padding else (0, 1)
    bad = ~torch.isin(labels, torch.tensor(valid, dtype=labels.dtype, device=labels.device))
    if bad.any():
        raise PromptError(f"point_labels must be 1 (foreground) or 0 (background)"
                          f"{' or -1 (padding)' if allow_padding else ''}; got {labels[bad][:5].tolist()}")
    real = coords[labels != -1]
    out = (real[:, 0] < 0) | (real[:, 0] > w) | (real[:, 1] < 0) | (real[:, 1] > h)
    if out.any():
        raise PromptError(f"point {real[out][0].tolist()} is outside the image: x must be in [0, {w}] and y in "
                          f"[0, {h}] (original-image pixels, x before y)")


def check_boxes(boxes: torch.Tensor, image_size: Tuple[int, int]) -> None:
    """(B,4) boxes x0, y0, x1, y1 with x1 >= x0, y1 >= y0, inside an (H, W) image."""
    h, w = image_size
    x0, y0, x1, y1 = boxes.unbind(-1)
    for i in range(boxes.shape[0]):
        b = boxes[i].tolist()
        if x1[i] < x0[i] or y1[i] < y0[i]:
            raise PromptError(f"box {b}: expected x0, y0, x1, y1 with x1 >= x0 and y1 >= y0")
        if x0[i] < 0 or y0[i] < 0 or x1[i] > w or y1[i] > h:
            raise PromptError(f"box {b} is outside the image: x in [0, {w}], y in [0, {h}] expected")
