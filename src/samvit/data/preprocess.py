"""The official SAM preprocessing and its inverse, in one place.

Forward: decoded RGB -> long side resized to the model's input size (Pillow bilinear, +0.5 rounding) -> (x - mean)
/ std -> zeros padded bottom/right. Inverse: prompt coordinates from original pixels to the resized input frame,
and mask logits from the padded input frame back to the original image.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .images import DEFAULT_MAX_PIXELS, ImageInput, load_image

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


@dataclass
class PreparedImage:
    """A preprocessed image: (3,S,S) float32 normalised and padded, with the sizes needed to map back."""

    tensor: torch.Tensor
    original_size: Tuple[int, int]  # (H, W) of the decoded image
    input_size: Tuple[int, int]  # (H, W) after the long-side resize, before padding


def get_preprocess_shape(h: int, w: int, long_side: int = 1024) -> Tuple[int, int]:
    """(H, W) after scaling the long side to long_side, rounded as the official code does; at least 1 pixel a
    side (the official rounding gives 0 for an image thinner than 1:2048, e.g. 1x5000, and then fails)."""
    scale = long_side * 1.0 / max(h, w)
    return max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))


def resize_longest_side(rgb: np.ndarray, long_side: int = 1024) -> np.ndarray:
    """Pillow bilinear resize of a uint8 RGB image so its long side is long_side (official ResizeLongestSide)."""
    h, w = rgb.shape[:2]
    newh, neww = get_preprocess_shape(h, w, long_side)
    return np.array(Image.fromarray(rgb).resize((neww, newh), Image.BILINEAR))


def normalize_and_pad(resized: np.ndarray, img_size: int = 1024) -> torch.Tensor:
    """HxWx3 uint8 -> (3,S,S) float32: (x - mean) / std, then zeros padded bottom/right."""
    x = torch.as_tensor(resized).permute(2, 0, 1).contiguous()
    mean = torch.tensor(PIXEL_MEAN).view(-1, 1, 1)
    std = torch.tensor(PIXEL_STD).view(-1, 1, 1)
    x = (x - mean) / std
    h, w = x.shape[-2:]
    return F.pad(x, (0, img_size - w, 0, img_size - h))


def prepare(rgb: np.ndarray, img_size: int = 1024) -> PreparedImage:
    """An HxWx3 uint8 RGB image -> the model input, as the official SamPredictor.set_image computes it."""
    resized = resize_longest_side(rgb, img_size)
    return PreparedImage(normalize_and_pad(resized, img_size), tuple(rgb.shape[:2]), tuple(resized.shape[:2]))


def preprocess(source: ImageInput, img_size: int = 1024, max_pixels: int = DEFAULT_MAX_PIXELS) -> PreparedImage:
    """Decode and preprocess one image exactly as the official SamPredictor.set_image does.

    Args:
        source: a path, PIL image or numpy array (see samvit.data.images for the conversion rule).
        img_size: the model's input side. max_pixels: larger images are refused (decompression bombs).
    Returns:
        PreparedImage: .tensor (3,S,S) float32, .original_size and .input_size as (H, W).
    """
    return prepare(load_image(source, max_pixels=max_pixels), img_size)


def collate(items: Sequence[PreparedImage]) -> torch.Tensor:
    """Stack prepared images into a (B,3,S,S) batch."""
    return torch.stack([it.tensor for it in items])


# ---- the inverse direction ----

def to_input_frame(coords: torch.Tensor, original_size: Tuple[int, int], input_size: Tuple[int, int],
                   device: Optional[torch.device] = None) -> torch.Tensor:
    """(..., 2) original-image (x, y) -> the resized input frame (float64 arithmetic as the official), float32."""
    (oh, ow), (nh, nw) = original_size, input_size
    scale = torch.tensor([nw / ow, nh / oh], dtype=torch.float64)
    return (coords.to(torch.float64).cpu() * scale).to(device=device, dtype=torch.float32)


def postprocess_masks(low_res: torch.Tensor, input_size: Tuple[int, int], original_size: Tuple[int, int],
                      img_size: int = 1024) -> torch.Tensor:
    """(B,M,h,w) mask logits of the padded input frame -> (B,M,H,W) float32 logits at the original size:
    upsample to img_size, crop the padding, resize to the original (bilinear, as the official)."""
    x = F.interpolate(low_res.float(), (img_size, img_size), mode="bilinear", align_corners=False)
    x = x[..., :input_size[0], :input_size[1]]
    return F.interpolate(x, original_size, mode="bilinear", align_corners=False)
