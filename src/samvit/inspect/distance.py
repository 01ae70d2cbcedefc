"""Mean attention distance and attention entropy per block and head (Dosovitskiy et al. 2021, Fig. 7).

For one query token, the mean attention distance is sum_k p(k) * |centre(query) - centre(key)| in input pixels
(patch centres; 16 px per token step for SAM), and the entropy is -sum_k p(k) ln p(k) in nats. Both are averaged
over the real query tokens of an image, then over the images (each image weighs the same).

Which tokens count. Queries: real grid tokens only, never a window's padded slots; with `image_only` (the default),
only tokens whose 16x16 patch holds a pixel of the image, not the zero canvas padding of a non-square image. Keys:
every key the model attends to, with the probability the model gives it. In a windowed block that includes the
window's padded slots (the official code pads the grid after norm1 and attends to them; their key is the qkv
bias). They are counted at their place on the padded grid, where the relative-position bias puts them, so a
windowed block's distances stay within its window: at most the window's diameter (ws - 1) * sqrt(2) * 16 px.
The mass they take is reported as `padding_mass`.
"""
from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Union

import numpy as np
import torch

from ..modeling.encoder import ImageEncoder
from .capture import CHUNK_ELEMS, Chunk, Prepared, _check_blocks, prepare, walk
from ..errors import ParameterError

CSV_COLUMNS = ("block", "head", "window", "mean_distance_px", "entropy")


def window_diameter_px(window_size: int, patch_size: int) -> float:
    """The largest distance between two patch centres of a ws x ws window: the bound on its mean distance."""
    return patch_size * (window_size - 1) * math.sqrt(2)


class DistanceStats:
    """Reducer: per block and head, the sums over one image's real queries of mean distance, entropy and the
    probability on padded window slots."""

    def __init__(self, patch_size: int, num_heads: int, image_tokens: Optional[torch.Tensor] = None,
                 distance_cache: Optional[Dict[tuple, torch.Tensor]] = None) -> None:
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.image_tokens = image_tokens
        self.sums: Dict[int, torch.Tensor] = {}  # block -> (3, heads) float64: distance, entropy, padding mass
        self.counts: Dict[int, int] = {}
        self.window: Dict[int, int] = {}
        self.distance_cache = {} if distance_cache is None else distance_cache  # may be shared between images
        self._masks: Dict[tuple, tuple] = {}

    def _geometry(self, chunk: Chunk):
        """The chunk's (queries, keys) distances, (windows, queries) query mask and (windows, keys) padding mask,
        each computed once per geometry (the same for every head and for blocks alike)."""
        dev = chunk.probs.device
        dkey = (chunk.win_shape, chunk.queries, self.patch_size, dev)
        if dkey not in self.distance_cache:
            self.distance_cache[dkey] = chunk.distances(self.patch_size).to(dev)
        mkey = (chunk.win_shape, chunk.window_size, chunk.grid, chunk.windows, chunk.queries, dev)
        if mkey not in self._masks:
            pad = chunk.key_mask().to(dev).logical_not()
            self._masks[mkey] = (chunk.query_mask(self.image_tokens).to(dev),
                                 pad.to(chunk.probs.dtype) if pad.any() else None)
        return (self.distance_cache[dkey],) + self._masks[mkey]

    def __call__(self, chunk: Chunk) -> None:
        probs = chunk.probs  # (windows, heads, queries, keys)
        dist_qk, qmask, pad = self._geometry(chunk)
        w, h, q, n = probs.shape
        # row-wise dot products as batched matrix-vector products: one pass each, no product tensor, no copy
        dist = torch.bmm(probs.view(w * h, q, n).transpose(0, 1), dist_qk[:, :, None]).view(q, w, h).permute(1, 2, 0)
        entropy = -torch.bmm(probs.view(-1, 1, n), chunk.log_probs.view(-1, n, 1)).view(w, h, q)  # -sum_k p ln p
        pad_mass = (torch.bmm(probs.view(w, h * q, n), pad[:, :, None]).view(w, h, q) if pad is not None
                    else torch.zeros_like(dist))
        b, (h0, h1) = chunk.block, chunk.heads
        if b not in self.sums:
            self.sums[b] = torch.zeros(3, self.num_heads, dtype=torch.float64)
            self.counts[b] = 0
            self.window[b] = chunk.window_size
        per_query = torch.stack([dist, entropy, pad_mass])  # (3, windows, heads, queries)
        self.sums[b][:, h0:h1] += torch.einsum("swhq,wq->sh", per_query, qmask.to(probs.dtype)).double().cpu()
        if h0 == 0:
            self.counts[b] += int(qmask.sum())

    def means(self, block: int) -> torch.Tensor:
        """(3, heads): this image's mean distance (px), entropy (nats) and padding mass per head."""
        if not self.counts.get(block):
            raise ParameterError(f"block {block}: no query token of the image was seen")
        return self.sums[block] / self.counts[block]


@dataclass
class DistanceResult:
    """Mean attention distance and entropy per block and head, averaged over images."""

    model: str
    patch_size: int
    blocks: List[int]
    windows: List[int]  # window size per block (0 = global)
    mean_distance: np.ndarray  # (blocks, heads) pixels
    entropy: np.ndarray  # (blocks, heads) nats
    padding_mass: np.ndarray  # (blocks, heads) probability on padded window slots
    per_image_distance: np.ndarray  # (images, blocks, heads) pixels
    images: List[str] = field(default_factory=list)

    def rows(self) -> List[Dict[str, Union[int, float]]]:
        """One dict per (block, head) with the CSV columns."""
        return [dict(block=b, head=h, window=ws, mean_distance_px=float(self.mean_distance[i, h]),
                     entropy=float(self.entropy[i, h]))
                for i, (b, ws) in enumerate(zip(self.blocks, self.windows))
                for h in range(self.mean_distance.shape[1])]

    def write_csv(self, path: Union[str, os.PathLike]) -> None:
        """Write rows() as CSV to path, atomically."""
        from ..checkpoints.files import atomic_write

        with atomic_write(path) as tmp, open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
            w.writeheader()
            for row in self.rows():
                w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def _as_list(images) -> list:
    if (isinstance(images, (str, os.PathLike, np.ndarray, Prepared)) or hasattr(images, "getpixel")  # PIL image
            or not isinstance(images, Iterable)):
        return [images]
    if isinstance(images, torch.Tensor):
        return [images] if images.ndim == 3 else list(images.unbind(0))
    return images


def attention_distance(encoder: ImageEncoder, images, blocks: Union[None, int, Iterable[int]] = None,
                       image_only: bool = True, chunk_elems: int = CHUNK_ELEMS,
                       progress: Optional[Callable[[int, int], None]] = None) -> DistanceResult:
    """Mean attention distance (pixels) and entropy (nats) per block and head over a set of images (paths, arrays,
    PIL images, PreparedImages, normalised tensors; an iterable is consumed lazily, one image in memory at a time).

    progress(image_index, block) is called after each block of each image.
    """
    blocks = _check_blocks(encoder, blocks)
    p = encoder.config.patch_size
    per_image, names, cache = [], [], {}
    for n, image in enumerate(_as_list(images)):
        prepared = prepare(image, encoder.config.img_size)
        stats = DistanceStats(p, encoder.config.num_heads, prepared.image_tokens(p) if image_only else None, cache)
        step = (lambda b, n=n: progress(n, b)) if progress else None
        walk(encoder, prepared.tensor, blocks, [stats], chunk_elems, progress=step, full=False)
        per_image.append(torch.stack([stats.means(b) for b in blocks]).numpy())  # (blocks, 3, heads)
        names.append(os.fspath(image) if isinstance(image, (str, os.PathLike)) else f"image {n}")
        windows = [stats.window[b] for b in blocks]
    if not per_image:
        raise ParameterError("attention_distance: no images given")
    arr = np.stack(per_image)  # (images, blocks, 3, heads)
    mean = arr.mean(0)
    return DistanceResult(encoder.config.name, p, blocks, windows, mean[:, 0], mean[:, 1], mean[:, 2], arr[:, :, 0],
                          names)
