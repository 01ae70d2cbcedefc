"""Image decoding and the official SAM preprocessing: resize long side, normalise, pad bottom/right.

Conversion rule for images that are not 8-bit RGB (files and arrays alike):
- grayscale (L, 1, HxW, HxWx1) is repeated to three channels; palette, CMYK, YCbCr, LAB, HSV convert to RGB
  with Pillow's own conversion;
- an alpha channel (RGBA, LA, PA, HxWx4, HxWx2) is dropped: the stored colour values are kept as they are;
- 16-bit integers are mapped to 8 bits by round(v / 257) (65535 -> 255); other wider integers are clipped
  to 0..65535 first; floats in [0, 1] are scaled by 255, other floats are clipped to 0..255; bools map to 0/255.
Files get their EXIF orientation applied before anything else.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm")
DEFAULT_MAX_PIXELS = 178_956_970  # Pillow's own decompression-bomb error limit (2 x MAX_IMAGE_PIXELS)

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray]


class ImageError(ValueError):
    """An input that cannot be read or converted into an RGB image."""


@dataclass
class PreparedImage:
    """A preprocessed image: (3,S,S) float32 normalised and padded, with the sizes needed to map back."""

    tensor: torch.Tensor
    original_size: Tuple[int, int]  # (H, W) of the decoded image
    input_size: Tuple[int, int]  # (H, W) after the long-side resize, before padding


def get_preprocess_shape(h: int, w: int, long_side: int = 1024) -> Tuple[int, int]:
    """(H, W) after scaling the long side to long_side, rounded as the official code does."""
    scale = long_side * 1.0 / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def _array_to_uint8(a: np.ndarray, name: str) -> np.ndarray:
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * 255
    if a.dtype == np.uint8:
        return a
    if np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            raise ImageError(f"{name}: float image has NaN or infinite values")
        if a.size and a.min() >= 0 and a.max() <= 1:
            a = a * 255.0
        return np.clip(np.rint(a), 0, 255).astype(np.uint8)
    if np.issubdtype(a.dtype, np.integer):
        if a.size and a.min() >= 0 and a.max() <= 255 and a.dtype.itemsize == 1:
            return a.astype(np.uint8)
        a = np.clip(a.astype(np.int64), 0, 65535)
        return np.rint(a / 257.0).astype(np.uint8)
    raise ImageError(f"{name}: unsupported array dtype {a.dtype}; expected uint8, uint16, float or bool")


def array_to_rgb(a: np.ndarray, name: str = "array") -> np.ndarray:
    """Any HxW / HxWxC (C in 1..4) array -> HxWx3 uint8 RGB, by the module's conversion rule."""
    a = np.asarray(a)
    if a.ndim == 3 and a.shape[2] in (1, 2):
        a = a[:, :, 0]
    if a.ndim == 3 and a.shape[2] == 4:
        a = a[:, :, :3]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] == 3)):
        raise ImageError(f"{name}: expected an HxW or HxWxC image array with C in 1..4, got shape {a.shape}")
    if a.shape[0] < 1 or a.shape[1] < 1:
        raise ImageError(f"{name}: empty image of shape {a.shape}")
    a = _array_to_uint8(a, name)
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    return np.ascontiguousarray(a)


def pil_to_rgb(img: Image.Image, name: str = "image") -> np.ndarray:
    """A Pillow image of any mode -> HxWx3 uint8 RGB, by the module's conversion rule."""
    if img.mode in ("P", "PA"):
        img = img.convert("RGBA")  # keeps the palette's colours; the alpha is dropped below
    elif img.mode not in ("RGB", "RGBA", "L", "LA", "1", "I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        img = img.convert("RGB")  # CMYK, YCbCr, LAB, HSV
    return array_to_rgb(np.asarray(img), name)


def load_image(source: ImageInput, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode a path, PIL image or numpy array into an HxWx3 uint8 RGB array (EXIF orientation applied)."""
    if isinstance(source, np.ndarray):
        return array_to_rgb(source)
    if isinstance(source, Image.Image):
        return pil_to_rgb(source)
    if not isinstance(source, (str, os.PathLike)):
        raise ImageError(f"expected an image path, a PIL image or a numpy array, got {type(source).__name__}")
    path = os.fspath(source)
    if not os.path.exists(path):
        raise ImageError(f"{path}: no such file")
    if os.path.isdir(path):
        raise ImageError(f"{path}: is a directory, expected an image file")
    if os.path.getsize(path) == 0:
        raise ImageError(f"{path}: empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                w, h = img.size
                if w * h > max_pixels:
                    raise ImageError(f"{path}: {w}x{h} = {w * h} pixels is over the limit of {max_pixels} "
                                     "(a possible decompression bomb; raise max_pixels to allow it)")
                img = ImageOps.exif_transpose(img)
                img.load()
                return pil_to_rgb(img, path)
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(f"{path}: {e}") from None
    except Exception as e:  # Pillow raises many types for truncated or foreign files
        raise ImageError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from None


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


def preprocess(source: ImageInput, img_size: int = 1024, max_pixels: int = DEFAULT_MAX_PIXELS) -> PreparedImage:
    """Decode and preprocess one image exactly as the official SamPredictor.set_image does."""
    rgb = load_image(source, max_pixels=max_pixels)
    resized = resize_longest_side(rgb, img_size)
    return PreparedImage(normalize_and_pad(resized, img_size), tuple(rgb.shape[:2]), tuple(resized.shape[:2]))


def collate(items: Sequence[PreparedImage]) -> torch.Tensor:
    """Stack prepared images into a (B,3,S,S) batch."""
    return torch.stack([it.tensor for it in items])
