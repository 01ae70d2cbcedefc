"""The pictures, as PNG files (matplotlib, the `inspect` extra): attention maps of one query per head, mean
attention distance per head against depth, and feature PCA as RGB.

Figures are drawn with matplotlib's object API (no pyplot, no global backend switch) at fixed sizes: a picture is
exactly the pixel size the functions return.
"""
from __future__ import annotations

import math
import os
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .capture import AttentionResult, Prepared
from .distance import DistanceResult, window_diameter_px
from .pca import PCAResult
from ..errors import ParameterError

DPI = 100
PANEL_IN = 3.0  # inches per attention / PCA panel
TITLE_IN = 0.75  # inches above the panels for the figure title (two lines)
DISTANCE_IN = (9.0, 5.0)

PathLike = Union[str, os.PathLike]


def _figure(width_in: float, height_in: float, dpi: int = DPI):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("the pictures need matplotlib: pip install 'samvit[inspect]'") from None
    fig = Figure(figsize=(width_in, height_in), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: PathLike) -> Tuple[int, int]:
    from ..checkpoints.files import atomic_write

    with atomic_write(path) as tmp:  # a full disk leaves the old file or none, never half a PNG
        fig.savefig(tmp, dpi=fig.dpi, format="png")  # no bbox_inches="tight": the size stays as laid out
    w, h = fig.get_size_inches() * fig.dpi
    return int(round(w)), int(round(h))


def display_rgb(prepared: Prepared) -> np.ndarray:
    """The decoded image, or for a tensor input its normalised channels stretched to 0..1 over the image area."""
    if prepared.rgb is not None:
        return prepared.rgb
    h, w = prepared.input_size
    t = prepared.tensor[0, :3, :h, :w].float()
    lo, hi = t.amin((1, 2), keepdim=True), t.amax((1, 2), keepdim=True)
    return ((t - lo) / (hi - lo).clamp(min=1e-12)).permute(1, 2, 0).cpu().numpy()


def _token_extent(prepared: Prepared, grid: Tuple[int, int], patch: int) -> Tuple[float, float, float, float]:
    """imshow extent (left, right, bottom, top) of the token grid in original-image pixels."""
    sy = prepared.input_size[0] / prepared.original_size[0]
    sx = prepared.input_size[1] / prepared.original_size[1]
    return 0.0, grid[1] * patch / sx, grid[0] * patch / sy, 0.0


def _show_image(ax, prepared: Prepared, gray: bool = False) -> None:
    rgb = display_rgb(prepared)
    oh, ow = prepared.original_size
    if gray:
        rgb = np.asarray(rgb, dtype=np.float32).mean(-1)
        ax.imshow(rgb, cmap="gray", extent=(0, ow, oh, 0), interpolation="bilinear")
    else:
        ax.imshow(rgb, extent=(0, ow, oh, 0), interpolation="bilinear")
    ax.set_xlim(0, ow)
    ax.set_ylim(oh, 0)
    ax.set_xticks([])
    ax.set_yticks([])


def grid_shape(n: int) -> Tuple[int, int]:
    """(rows, cols) of a near-square grid of n panels."""
    cols = max(1, math.ceil(math.sqrt(n)))
    return math.ceil(n / cols), cols


def panel_height_in(original_size: Tuple[int, int]) -> float:
    """Height (inches) of a PANEL_IN-wide panel showing an image of (h, w) pixels; aspect clipped to 1:2..2:1."""
    return PANEL_IN * min(2.0, max(0.5, original_size[0] / original_size[1]))


def plot_attention(result: AttentionResult, block: int, path: PathLike, patch_size: int, query: int = 0,
                   heads: Optional[Sequence[int]] = None, title: str = "", dpi: int = DPI) -> Tuple[int, int]:
    """One panel per head: the attention of query `query` drawn over the image (each head scaled to its own
    maximum), the query marked, a windowed block's window outlined; the panel title gives the query's mean
    attention distance and the probability off the image (window padding slots, canvas padding), which is not
    drawn. Returns the PNG's (width, height)."""
    from matplotlib.patches import Rectangle

    ba = result.blocks[block]
    prepared = result.prepared
    maps = ba.grid_map(query).numpy()  # (heads, H, W)
    image_tokens = result.image_tokens.numpy()
    n_heads = maps.shape[0]
    heads = list(range(n_heads)) if heads is None else list(heads)
    for h in heads:
        if not 0 <= h < n_heads:
            raise ParameterError(f"head {h} does not exist: block {block} has heads 0..{n_heads - 1}")
    rows, cols = grid_shape(len(heads))
    ph = panel_height_in(prepared.original_size) + 0.25  # + a line of panel title
    fig = _figure(cols * PANEL_IN, rows * ph + TITLE_IN, dpi)
    top = 1 - TITLE_IN / (rows * ph + TITLE_IN)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=top, wspace=0.04, hspace=0.25 / ph * 1.2)
    extent = _token_extent(prepared, ba.grid, patch_size)
    sy = prepared.input_size[0] / prepared.original_size[0]
    sx = prepared.input_size[1] / prepared.original_size[1]
    qr, qc = ba.queries[query]
    dist = _query_distances(ba, query, patch_size)
    for j, h in enumerate(heads):
        ax = fig.add_subplot(rows, cols, j + 1)
        _show_image(ax, prepared, gray=True)
        m = maps[h]
        ax.imshow(np.ma.masked_less_equal(m, 0), cmap="inferno", alpha=0.7, extent=extent, interpolation="nearest",
                  vmin=0, vmax=max(float(m.max()), 1e-12))
        ax.plot([(qc + 0.5) * patch_size / sx], [(qr + 0.5) * patch_size / sy], marker="+", color="cyan",
                markersize=10, markeredgewidth=2)
        if ba.window_size:
            r0, c0 = ba.origins[query]
            ax.add_patch(Rectangle((c0 * patch_size / sx, r0 * patch_size / sy), ba.window_size * patch_size / sx,
                                   ba.window_size * patch_size / sy, fill=False, edgecolor="cyan", linewidth=1.5))
        label = f"head {h}: {dist[h]:.0f} px, max p {m.max():.2g}"
        off = 1.0 - float(m[image_tokens].sum())  # on window padding slots or on the canvas padding: not drawn
        if off > 0.005:
            label += f", off-image {off:.2f}"
        ax.set_title(label, fontsize=8)
    kind = f"windowed {ba.window_size}x{ba.window_size}" if ba.window_size else "global"
    fig.suptitle(f"{title}\nblock {block} ({kind}), query token (row {qr}, col {qc})".strip(), fontsize=10)
    return _save(fig, path)


def _query_distances(ba, query: int, patch_size: int) -> np.ndarray:
    """Mean attention distance (px) of one query per head, over all its keys (padded slots at their place)."""
    r, c, _ = ba.key_tokens(query)
    qr, qc = ba.queries[query]
    d = patch_size * torch.sqrt(((r - qr) ** 2 + (c - qc) ** 2).float())
    return (ba.probs[query] * d).sum(-1).numpy()


def uniform_mean_distance(h: int, w: int, patch_size: int) -> float:
    """Mean distance (px) between the patch centres of all (query, key) pairs of an h x w grid: the mean attention
    distance of uniform attention over the grid, computed from the count of each offset."""
    dr, dc = np.meshgrid(np.arange(-h + 1, h), np.arange(-w + 1, w), indexing="ij")
    count = (h - np.abs(dr)) * (w - np.abs(dc))
    return float(patch_size * (count * np.hypot(dr, dc)).sum() / (h * w) ** 2)


def plot_distance(result: DistanceResult, path: PathLike, title: str = "", grid: Optional[Tuple[int, int]] = None,
                  dpi: int = DPI) -> Tuple[int, int]:
    """Mean attention distance per head (one dot each) against block depth; windowed and global blocks in two
    colours; the window limit (its diameter) and uniform attention over a window / the whole grid drawn in."""
    fig = _figure(*DISTANCE_IN, dpi)
    ax = fig.add_subplot(1, 1, 1)
    fig.subplots_adjust(left=0.09, right=0.98, bottom=0.11, top=0.88)
    d, blocks, wins = result.mean_distance, np.asarray(result.blocks), np.asarray(result.windows)
    n_heads = d.shape[1]
    offsets = (np.arange(n_heads) - (n_heads - 1) / 2) * (0.6 / max(n_heads, 1))  # heads side by side in a block
    for is_win, color, label in ((True, "tab:blue", "windowed block"), (False, "tab:orange", "global block")):
        sel = (wins > 0) == is_win
        if sel.any():
            x = (blocks[sel][:, None] + offsets[None, :]).reshape(-1)
            ax.scatter(x, d[sel].reshape(-1), s=10, color=color, alpha=0.8, label=f"{label} (one dot per head)")
    p = result.patch_size
    for ws in sorted(set(int(w) for w in wins if w > 0)):
        ax.axhline(window_diameter_px(ws, p), color="tab:blue", linestyle="--", linewidth=1,
                   label=f"window limit: {ws}x{ws} diameter, {window_diameter_px(ws, p):.0f} px")
        ax.axhline(uniform_mean_distance(ws, ws, p), color="tab:blue", linestyle=":", linewidth=1,
                   label=f"uniform over a {ws}x{ws} window, {uniform_mean_distance(ws, ws, p):.0f} px")
    if grid is not None and (wins == 0).any():
        u = uniform_mean_distance(grid[0], grid[1], p)
        ax.axhline(u, color="tab:orange", linestyle=":", linewidth=1,
                   label=f"uniform over the {grid[0]}x{grid[1]} grid, {u:.0f} px")
    ax.set_xlabel("block (0-based)")
    ax.set_ylabel("mean attention distance (input pixels)")
    ax.set_xticks(blocks if len(blocks) <= 32 else blocks[::2])
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    n = len(result.per_image_distance)
    fig.suptitle(f"{title}\n{result.model}: mean attention distance per head, {n} image{'s' * (n != 1)}".strip(),
                 fontsize=10)
    return _save(fig, path)


def plot_pca(result: PCAResult, path: PathLike, patch_size: int, title: str = "", dpi: int = DPI
             ) -> Tuple[int, int]:
    """The image beside the first three principal components of its features (pre-neck, post-neck) as RGB."""
    prepared = result.prepared
    panels: List[Tuple[str, Optional[np.ndarray]]] = [("image", None),
                                                       (_pca_label("pre-neck", result.explained_pre),
                                                        result.pre_neck)]
    if result.post_neck is not None:
        panels.append((_pca_label("post-neck", result.explained_post), result.post_neck))
    ph = panel_height_in(prepared.original_size) + 0.25
    fig = _figure(len(panels) * PANEL_IN, ph + TITLE_IN, dpi)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - TITLE_IN / (ph + TITLE_IN), wspace=0.04)
    grid = result.pre_neck.shape[:2]
    for j, (label, rgb) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), j + 1)
        if rgb is None:
            _show_image(ax, prepared)
        else:
            oh, ow = prepared.original_size
            ax.imshow(np.where(result.image_tokens[..., None], rgb, 0.0), extent=_token_extent(prepared, grid,
                      patch_size), interpolation="nearest")
            ax.set_xlim(0, ow)
            ax.set_ylim(oh, 0)
            ax.set_xticks([])
            ax.set_yticks([])
        ax.set_title(label, fontsize=8)
    fig.suptitle(f"{title}\nfirst 3 principal components of the {grid[0]}x{grid[1]} features as RGB".strip(),
                 fontsize=10)
    return _save(fig, path)


def _pca_label(name: str, ratio: np.ndarray) -> str:
    return f"{name}: PC1-3 explain " + " / ".join(f"{100 * r:.0f}%" for r in ratio)
