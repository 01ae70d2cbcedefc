"""The first principal components of the encoder's token features, as an RGB picture of the grid.

The components are fitted on the image tokens only (not the canvas padding of a non-square image), in float64,
then every token is projected. Each component is shown with its sign fixed (the largest loading positive) and its
1st..99th percentile over the image tokens stretched to 0..1.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch

from ..modeling.encoder import ImageEncoder
from .capture import Prepared, prepare, walk
from ..errors import ParameterError


def principal_components(features: torch.Tensor, mask: Optional[torch.Tensor] = None, k: int = 3
                         ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(H,W,C) features -> (projections (H,W,k), components (k,C), explained variance ratios (k,)), fitted on the
    tokens where mask (H,W) is True."""
    H, W, C = features.shape
    x = features.reshape(H * W, C).double().cpu()
    fit = x[mask.reshape(-1).cpu()] if mask is not None else x
    if fit.shape[0] < 2:
        raise ParameterError(f"PCA needs at least 2 tokens, got {fit.shape[0]}")
    k = min(k, C)
    mean = fit.mean(0)
    cov = (fit - mean).T @ (fit - mean) / (fit.shape[0] - 1)
    evals, evecs = torch.linalg.eigh(cov)  # ascending
    evals, evecs = evals.flip(0).clamp(min=0), evecs.flip(1)
    comps = evecs[:, :k].T.clone()  # (k, C)
    sign = torch.sign(comps.gather(1, comps.abs().argmax(1, keepdim=True)))
    comps *= sign
    proj = (x - mean) @ comps.T
    ratio = evals[:k] / evals.sum() if evals.sum() > 0 else torch.zeros(k, dtype=torch.float64)
    return proj.reshape(H, W, k).numpy(), comps.numpy(), ratio.numpy()


def to_rgb(proj: np.ndarray, mask: Optional[np.ndarray] = None, lo: float = 1.0, hi: float = 99.0) -> np.ndarray:
    """(H,W,3) projections -> (H,W,3) float in [0,1]: each channel's lo..hi percentile over the masked tokens."""
    sel = proj[mask] if mask is not None else proj.reshape(-1, proj.shape[-1])
    a, b = np.percentile(sel, lo, axis=0), np.percentile(sel, hi, axis=0)
    return np.clip((proj - a) / np.where(b > a, b - a, 1.0), 0.0, 1.0)


@dataclass
class PCAResult:
    """RGB pictures of the first three components before and after the neck (None without a neck)."""

    pre_neck: np.ndarray  # (H,W,3) in [0,1]
    post_neck: Optional[np.ndarray]
    explained_pre: np.ndarray  # (3,) explained variance ratios
    explained_post: Optional[np.ndarray]
    image_tokens: np.ndarray  # (H,W) bool
    prepared: Prepared


@torch.no_grad()
def feature_pca(encoder: ImageEncoder, image, k: int = 3) -> PCAResult:
    """First k principal components of one image's token features, pre-neck (H,W,C) and post-neck (H,W,out)."""
    prepared = prepare(image, encoder.config.img_size)
    mask = prepared.image_tokens(encoder.config.patch_size)
    feats = walk(encoder, prepared.tensor, [], [])  # the blocks' own forward: forward_features' values
    m = mask.numpy()
    proj, _, ratio = principal_components(feats[0], mask, k)
    post, ratio_post = None, None
    if encoder.neck is not None:
        neck_in = feats.to(encoder.neck[0].weight.dtype).permute(0, 3, 1, 2)
        out = encoder.neck(neck_in).float().permute(0, 2, 3, 1)[0]
        proj_post, _, ratio_post = principal_components(out, mask, k)
        post = to_rgb(proj_post, m)
    return PCAResult(to_rgb(proj, m), post, ratio, ratio_post, m, prepared)
