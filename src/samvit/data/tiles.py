"""Tiling large images: a grid of SIZE x SIZE cells over the original image, each grown by a halo.

The grid is laid from the top-left corner (ceil(H/SIZE) rows, ceil(W/SIZE) columns; the last row and column are
cut by the image border); each tile is its cell (the "core") grown by `halo` pixels on every side and clipped to
the image. Boxes are (x0, y0, x1, y1), half-open, in original pixels, row-major. An image no larger than SIZE
gives one tile: the whole image. Each tile is preprocessed like a whole image, so its embedding is exactly what
SAM gives for that crop.
"""
from __future__ import annotations

import math
from typing import List, Tuple

from ..errors import ParameterError

Box = Tuple[int, int, int, int]


def tile_grid(height: int, width: int, size: int, halo: int = 0) -> List[Tuple[Box, Box]]:
    """(core, box) of every tile of an HxW image, row-major (see the module docstring)."""
    if size < 1 or halo < 0:
        raise ParameterError(f"tile size must be >= 1 and halo >= 0, got size {size}, halo {halo}")
    out = []
    for r in range(math.ceil(height / size)):
        for c in range(math.ceil(width / size)):
            core = (c * size, r * size, min((c + 1) * size, width), min((r + 1) * size, height))
            box = (max(0, core[0] - halo), max(0, core[1] - halo), min(width, core[2] + halo),
                   min(height, core[3] + halo))
            out.append((core, box))
    return out
