"""Image decoding: files, PIL images and arrays -> HxWx3 uint8 RGB.

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
from typing import Union

import numpy as np
from PIL import Image, ImageOps

from ..errors import SamvitError, open_regular

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm")
DEFAULT_MAX_PIXELS = 178_956_970  # Pillow's own decompression-bomb error limit (2 x MAX_IMAGE_PIXELS)

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray]


class ImageError(SamvitError, ValueError):
    """An input that cannot be read or converted into an RGB image."""


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
    with open_regular(path, "image file", ImageError) as f:  # a FIFO, a device or a folder is refused, unopened
        if os.fstat(f.fileno()).st_size == 0:
            raise ImageError(f"{path}: empty file (0 bytes)")
        return _decode(f, path, max_pixels)


def _decode(f, path: str, max_pixels: int) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(f) as img:
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
