"""Instance masks for fine-tuning and evaluating SAM: three sources, one sample format, the first prompts.

Sources (each: len, load(i) -> (rgb, masks, problems), name(i), key(i), path(i), problems):
- MaskFolder: DIR/images/NAME.(png|jpg|jpeg|...) with DIR/masks/NAME.png; in the mask 0 is background and every
  other value (grey level, palette index, 16-bit label, or RGB colour) is one instance;
- CocoMasks: a COCO-style annotations JSON (polygons, RLE, uncompressed RLE; decoded by pycocotools) with an
  images folder; crowd regions are not instances;
- ShapeMasks: the synthetic shapes of samvit.train.shapes (the default style, or the shifted one).

A problem (an image that cannot be decoded, a mask of another size, an annotation that is malformed or empty)
skips the image or the annotation, is counted under its reason, and never stops a run.

MaskSamples turns a source into training samples: the image through the official preprocessing (long side
resized, normalised, padded; or its embedding read from an EmbeddingStore), K instances with their masks
resized and padded the same way and taken down to the decoder's low-res grid (256 x 256 for a 1024 input; the
loss is computed there, as SAM's decoder predicts it), and the first prompt of each (SAM's simulation).
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
from collections import Counter
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..data.images import IMAGE_EXTENSIONS, ImageError, load_image
from ..data.preprocess import get_preprocess_shape, prepare
from ..errors import InputError, ParameterError
from ..masks.automatic import masks_to_boxes
from .data import sample_generator
from .shapes import SyntheticShapes

log = logging.getLogger("samvit.train")
Problems = List[Tuple[str, str]]  # (item name, reason)
BOX_NOISE_FRACTION = 0.1  # std of the box noise: 10% of the box's side (SAM paper, appendix A)
BOX_NOISE_MAX = 20.0  # the noise is clipped to 20 pixels of a 1024 input (scaled with the input size)


class MaskError(InputError):
    """A mask file, annotation or annotations file that cannot be used."""


def labels_to_masks(labels: np.ndarray) -> np.ndarray:
    """A label image -> (N,H,W) bool, one mask per distinct non-zero value (per colour for HxWx3), in value order."""
    if labels.ndim == 3:
        flat = labels[..., 0].astype(np.int64) << 16 | labels[..., 1].astype(np.int64) << 8 | labels[..., 2]
    else:
        flat = labels.astype(np.int64)
    ids = np.unique(flat)
    ids = ids[ids != 0]
    if not len(ids):
        return np.zeros((0, *flat.shape), dtype=bool)
    return flat[None] == ids[:, None, None]


def read_label_png(path: str) -> np.ndarray:
    """A mask PNG -> its label array: HxW (L, P: palette index, I;16, I, 1) or HxWx3 (RGB: one id per colour)."""
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("RGBA", "LA", "PA"):
                img = img.convert("RGB" if img.mode == "RGBA" else "L" if img.mode == "LA" else "P")
            if img.mode not in ("1", "L", "P", "I", "I;16", "I;16B", "I;16L", "RGB"):
                raise MaskError(f"{path}: mask mode {img.mode!r} (expected a label image: L, P, I;16, I or RGB)")
            return np.asarray(img)
    except MaskError:
        raise
    except Exception as e:
        raise MaskError(f"{path}: cannot read mask ({type(e).__name__}: {e})") from None


class MaskFolder:
    """DIR/images/NAME.ext with DIR/masks/NAME.png (0 background, each other value one instance)."""

    def __init__(self, root: Union[str, os.PathLike], flag: str = "--data") -> None:
        root = os.fspath(root)
        images, masks = os.path.join(root, "images"), os.path.join(root, "masks")
        if not os.path.isdir(images) or not os.path.isdir(masks):
            raise FileNotFoundError(f"{flag} {root}: expected a folder with images/ and masks/ subfolders "
                                    "(images/NAME.png|jpg and masks/NAME.png)"
                                    + (", or a COCO annotations .json" if flag == "--data" else ""))
        self.root, self.problems = root, Counter()
        self.items: List[Tuple[str, str, str]] = []  # (key, image path, mask path)
        self.missing: Problems = []
        names = sorted(f for f in os.listdir(images) if f.lower().endswith(IMAGE_EXTENSIONS))
        for f in names:
            stem = os.path.splitext(f)[0]
            mask = os.path.join(masks, stem + ".png")
            if os.path.isfile(mask):
                self.items.append((f, os.path.join(images, f), mask))
            else:
                self.problems["image without mask"] += 1
                self.missing.append((os.path.join(images, f), f"no mask file {mask}"))
        if not self.items:
            raise ParameterError(f"{flag} {root}: no image in images/ has a mask masks/NAME.png")

    def __len__(self) -> int:
        return len(self.items)

    def name(self, i: int) -> str:
        return self.items[i][1]

    def key(self, i: int) -> str:
        """The image's key in an embedding store made by `samvit embed DIR/images --store` (its relative path)."""
        return self.items[i][0]

    def path(self, i: int) -> Optional[str]:
        return self.items[i][1]

    def load(self, i: int) -> Tuple[np.ndarray, np.ndarray, Problems]:
        _, image_path, mask_path = self.items[i]
        rgb = load_image(image_path)
        masks = labels_to_masks(read_label_png(mask_path))
        if masks.shape[1:] != rgb.shape[:2]:
            raise MaskError(f"{mask_path}: mask is {masks.shape[2]}x{masks.shape[1]}, its image "
                            f"{rgb.shape[1]}x{rgb.shape[0]}")
        return rgb, masks, []


class CocoMasks:
    """A COCO-style annotations file (polygons, RLE, uncompressed RLE) and the folder of its images."""

    def __init__(self, annotations: Union[str, os.PathLike], images: Union[str, os.PathLike]) -> None:
        if importlib.util.find_spec("pycocotools") is None:
            raise ImportError("COCO annotations need pycocotools (pip install 'samvit[finetune]')")
        annotations, images = os.fspath(annotations), os.fspath(images)
        if not os.path.isdir(images):
            raise FileNotFoundError(f"--images {images}: no such directory (the folder of the COCO file's images)")
        try:
            with open(annotations, encoding="utf-8") as fh:
                data = json.load(fh)
        except (OSError, json.JSONDecodeError) as e:
            raise MaskError(f"--data {annotations}: cannot read a COCO annotations JSON ({e})") from None
        if not isinstance(data, dict) or not isinstance(data.get("images"), list) or \
                not isinstance(data.get("annotations"), list):
            raise MaskError(f"--data {annotations}: not a COCO annotations file (expected 'images' and "
                             "'annotations' lists)")
        self.root, self.problems, self.missing = images, Counter(), []
        by_image: Dict[object, list] = {}
        for ann in data["annotations"]:
            reason = _check_annotation(ann)
            if reason:
                self.problems[reason] += 1
                self.missing.append((f"annotation {ann.get('id') if isinstance(ann, dict) else ann!r}", reason))
                continue
            by_image.setdefault(ann["image_id"], []).append(ann)
        self.items: List[Tuple[str, dict, list]] = []  # (file name, image record, annotations)
        for rec in data["images"]:
            if not isinstance(rec, dict) or "file_name" not in rec or "id" not in rec:
                self.problems["image record without id or file_name"] += 1
                continue
            anns = by_image.get(rec["id"], [])
            if not anns:
                self.problems["image without usable annotations"] += 1
                continue
            if not os.path.isfile(os.path.join(images, rec["file_name"])):
                self.problems["image file missing"] += 1
                self.missing.append((os.path.join(images, rec["file_name"]), "no such file"))
                continue
            self.items.append((rec["file_name"], rec, anns))
        if not self.items:
            raise MaskError(f"--data {annotations}: no image with a usable annotation and an existing file in "
                             f"{images} ({dict(self.problems)})")

    def __len__(self) -> int:
        return len(self.items)

    def name(self, i: int) -> str:
        return os.path.join(self.root, self.items[i][0])

    def key(self, i: int) -> str:
        return self.items[i][0].replace(os.sep, "/")

    def path(self, i: int) -> Optional[str]:
        return self.name(i)

    def load(self, i: int) -> Tuple[np.ndarray, np.ndarray, Problems]:
        from pycocotools import mask as mask_utils

        file_name, rec, anns = self.items[i]
        rgb = load_image(os.path.join(self.root, file_name))
        h, w = rgb.shape[:2]
        if (rec.get("height"), rec.get("width")) not in ((None, None), (h, w)):
            raise MaskError(f"{file_name}: the annotations say {rec.get('width')}x{rec.get('height')}, the image "
                            f"is {w}x{h}")
        masks, problems = [], []
        for ann in anns:
            seg = ann["segmentation"]
            try:
                if isinstance(seg, list):  # polygons
                    rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
                elif isinstance(seg["counts"], list):  # uncompressed RLE
                    rle = mask_utils.frPyObjects(seg, h, w)
                else:
                    rle = seg
                    if list(rle["size"]) != [h, w]:
                        raise MaskError(f"RLE of size {rle['size']} on a {h}x{w} image")
                m = mask_utils.decode(rle).astype(bool)
            except Exception as e:  # pycocotools raises plain Exceptions for malformed input
                problems.append((f"annotation {ann.get('id')}", f"cannot decode segmentation ({e})"))
                continue
            if m.shape != (h, w):
                problems.append((f"annotation {ann.get('id')}", f"mask of shape {m.shape} on a {h}x{w} image"))
            elif not m.any():
                problems.append((f"annotation {ann.get('id')}", "empty mask"))
            else:
                masks.append(m)
        return rgb, np.stack(masks) if masks else np.zeros((0, h, w), dtype=bool), problems


def _check_annotation(ann) -> Optional[str]:
    """Why a COCO annotation cannot be used (before decoding), or None."""
    if not isinstance(ann, dict) or "image_id" not in ann:
        return "annotation without image_id"
    if ann.get("iscrowd", 0):
        return "crowd region"
    seg = ann.get("segmentation")
    if isinstance(seg, list):
        polys = [p for p in seg if isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 and
                 all(isinstance(v, (int, float)) and np.isfinite(v) for v in p)]
        if not seg or len(polys) != len(seg):
            return "malformed polygon"
        return None
    if isinstance(seg, dict) and "counts" in seg and isinstance(seg.get("size"), (list, tuple)) and \
            len(seg["size"]) == 2:
        return None
    return "no segmentation"


class ShapeMasks:
    """Synthetic shapes with instance masks (samvit.train.shapes), n pictures of size px; style 'shifted': the
    other distribution (stars, rings, blobs over stripes or checks), for transfer tests."""

    def __init__(self, n: int, size: int = 256, seed: int = 0, style: str = "shapes") -> None:
        self.shapes = SyntheticShapes(n, size=size, seed=seed, style=style)
        self.problems, self.missing = Counter(), []

    def __len__(self) -> int:
        return len(self.shapes)

    def name(self, i: int) -> str:
        return self.shapes.name(i)

    def key(self, i: int) -> str:
        return f"shape_{i:06d}.png" if self.shapes.style == "shapes" else f"shifted_{i:06d}.png"

    def path(self, i: int) -> Optional[str]:
        return None

    def load(self, i: int) -> Tuple[np.ndarray, np.ndarray, Problems]:
        s = self.shapes[i]
        return s.image, s.masks, []


MaskSource = Union[MaskFolder, CocoMasks, ShapeMasks]


def open_masks(data: str, images: Optional[str] = None, synthetic_size: int = 256, synthetic_px: int = 256,
               seed: int = 0) -> MaskSource:
    """--data: a mask folder, a COCO .json (with --images DIR), or 'synthetic' (synthetic_size pictures)."""
    if data == "synthetic":
        return ShapeMasks(synthetic_size, synthetic_px, seed)
    if data.lower().endswith(".json"):
        if images is None:
            raise ParameterError(f"--data {data}: a COCO annotations file needs --images DIR (the folder of its "
                                 "images)")
        if not os.path.isfile(data):
            raise FileNotFoundError(f"--data {data}: no such file")
        return CocoMasks(data, images)
    if images is not None:
        raise ParameterError("--images only applies to a COCO annotations .json given as --data")
    if not os.path.isdir(data):
        raise FileNotFoundError(f"--data {data}: no such directory (expected DIR with images/ and masks/, a COCO "
                                ".json with --images, or 'synthetic')")
    return MaskFolder(data)


def save_mask_folder(source: MaskSource, out: Union[str, os.PathLike], indices: Optional[Sequence[int]] = None
                     ) -> str:
    """Write a source as a mask folder (out/images/NAME.png, out/masks/NAME.png, labels 1..N in 16 bits when
    there are more than 255 instances); returns out. For tests and demos (e.g. an embedding store of shapes)."""
    out = os.fspath(out)
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    os.makedirs(os.path.join(out, "masks"), exist_ok=True)
    for i in range(len(source)) if indices is None else indices:
        rgb, masks, _ = source.load(i)
        stem = os.path.splitext(source.key(i))[0].replace("/", "_")
        labels = np.zeros(rgb.shape[:2], dtype=np.uint16 if len(masks) > 255 else np.uint8)
        for k, m in enumerate(masks, 1):
            labels[m] = k
        Image.fromarray(rgb).save(os.path.join(out, "images", stem + ".png"))
        Image.fromarray(labels).save(os.path.join(out, "masks", stem + ".png"))
    return out


# ---- masks into the model's frames ----

def low_res_targets(masks: np.ndarray, img_size: int, low_res: int) -> np.ndarray:
    """(N,H,W) bool original masks -> (N,L,L) bool in the decoder's low-res frame: resized like the image (long side
    to img_size, Pillow bilinear), zero-padded bottom/right to img_size, averaged over (img_size/L)^2 blocks and
    thresholded at one half."""
    if img_size % low_res:
        raise ParameterError(f"the input size {img_size} is not a multiple of the low-res size {low_res}")
    n, h, w = masks.shape
    nh, nw = get_preprocess_shape(h, w, img_size)
    s = img_size // low_res
    out = np.zeros((n, low_res, low_res), dtype=bool)
    for k in range(n):
        resized = np.asarray(Image.fromarray(masks[k].astype(np.uint8) * 255).resize((nw, nh), Image.BILINEAR))
        padded = np.zeros((img_size, img_size), dtype=np.float32)
        padded[:nh, :nw] = resized
        out[k] = padded.reshape(low_res, s, low_res, s).mean((1, 3)) >= 127.5
    return out


def sample_point(mask: np.ndarray, g: torch.Generator) -> np.ndarray:
    """A pixel (x, y) drawn uniformly from the mask's pixels."""
    ys, xs = np.nonzero(mask)
    k = int(torch.randint(len(xs), (1,), generator=g))
    return np.array([xs[k], ys[k]], dtype=np.float64)


def noisy_box(box: np.ndarray, input_hw: Tuple[int, int], img_size: int, g: torch.Generator) -> np.ndarray:
    """SAM's box prompt: each coordinate moved by Gaussian noise of std 10% of the box's side (width for x,
    height for y), clipped to 20 px of a 1024 input; box in the input frame, kept inside the image and ordered."""
    x0, y0, x1, y1 = box
    side = np.array([x1 - x0, y1 - y0, x1 - x0, y1 - y0], dtype=np.float64)
    cap = BOX_NOISE_MAX * img_size / 1024
    noise = torch.randn(4, generator=g, dtype=torch.float64).numpy() * BOX_NOISE_FRACTION * side
    out = box + np.clip(noise, -cap, cap)
    h, w = input_hw
    out[[0, 2]] = np.clip(out[[0, 2]], 0, w)
    out[[1, 3]] = np.clip(out[[1, 3]], 0, h)
    return np.array([min(out[0], out[2]), min(out[1], out[3]), max(out[0], out[2]), max(out[1], out[3])])


class MaskSamples(Dataset):
    """Training samples of a mask source: keys (epoch, index) -> dict of tensors

        image (3,S,S) float32 (or embedding (C,h,w) float32 when an EmbeddingStore is given),
        targets (K,L,L) bool, valid (K,) bool (False for padding, when the image has fewer than K instances, and
        for an instance too small to cover half a low-res pixel),
        point (K,2) and box (K,4) float32 in the input frame (both drawn; use_box (K,) bool picks one, at equal
        odds), click_seed (K,) int64 (the seed of each mask's correction clicks), index ().

    Every draw comes from the sample's own generator (seed, epoch, index): samples do not depend on workers,
    processes or resumes. An image that cannot be used is reported and replaced by the next usable one.
    """

    def __init__(self, source: MaskSource, img_size: int, low_res: int, masks_per_image: int, seed: int = 0,
                 store=None, report: Optional[str] = None) -> None:
        if masks_per_image < 1:
            raise ParameterError(f"--masks-per-image must be at least 1, got {masks_per_image}")
        self.source, self.img_size, self.low_res, self.k = source, img_size, low_res, masks_per_image
        self.seed, self.store, self.report = seed, store, report
        self._bad: set = set()
        self._reported: set = set()

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: Union[int, Tuple[int, int]]) -> Dict[str, torch.Tensor]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        index, rgb, masks = self._load(index)
        return self.make_sample(rgb, masks, sample_generator(self.seed, epoch, index), index)

    def make_sample(self, rgb: np.ndarray, masks: np.ndarray, g: torch.Generator, index: int
                    ) -> Dict[str, torch.Tensor]:
        """The sample of one image and its (N,H,W) masks (N >= 1)."""
        h, w = rgb.shape[:2]
        input_hw = get_preprocess_shape(h, w, self.img_size)
        scale = np.array([input_hw[1] / w, input_hw[0] / h] * 2)
        k = self.k
        chosen = torch.randperm(len(masks), generator=g)[:k].tolist()
        sample = {"targets": torch.zeros(k, self.low_res, self.low_res, dtype=torch.bool),
                  "valid": torch.zeros(k, dtype=torch.bool), "point": torch.zeros(k, 2),
                  "box": torch.zeros(k, 4), "use_box": torch.zeros(k, dtype=torch.bool),
                  "click_seed": torch.zeros(k, dtype=torch.int64), "index": torch.tensor(index)}
        sample["targets"][:len(chosen)] = torch.from_numpy(low_res_targets(masks[chosen], self.img_size,
                                                                           self.low_res))
        boxes = masks_to_boxes(torch.from_numpy(masks[chosen]).bool()).double().numpy()  # x1, y1 inclusive
        for j, m in enumerate(masks[chosen]):
            sample["valid"][j] = bool(sample["targets"][j].any())  # too small for the low-res grid: not trained
            sample["point"][j] = torch.from_numpy(sample_point(m, g) * scale[:2])
            sample["box"][j] = torch.from_numpy(noisy_box(boxes[j] * scale, input_hw, self.img_size, g))
            sample["use_box"][j] = bool(torch.rand(1, generator=g) < 0.5)
            sample["click_seed"][j] = int(torch.randint(2 ** 62, (1,), generator=g))
        if self.store is not None:
            emb, original_size, _ = self.store.image_embedding(self.source.key(index))
            if tuple(original_size) != (h, w):
                raise MaskError(f"{self.source.name(index)}: the store's embedding is of a {original_size} image, "
                                f"the image is {(h, w)} (the file changed since it was embedded?)")
            sample["embedding"] = emb.float()
        else:
            sample["image"] = prepare(rgb, self.img_size).tensor
        return sample

    def _load(self, index: int) -> Tuple[int, np.ndarray, np.ndarray]:
        n = len(self.source)
        for step in range(n):
            i = (index + step) % n
            if i in self._bad:
                continue
            if self.store is not None and self.source.key(i) not in self.store:
                self._skip(i, f"not in the embedding store {self.store.path} (it failed to embed?)")
                continue
            try:
                rgb, masks, problems = self.source.load(i)
            except (ImageError, MaskError) as e:
                self._skip(i, str(e))
                continue
            for name, reason in problems:
                if (i, name) not in self._reported:  # once (per process), not every epoch
                    self._reported.add((i, name))
                    self._write({"item": name, "image": self.source.name(i), "reason": reason})
            if len(masks) == 0:
                self._skip(i, "no usable instance")
                continue
            return i, rgb, masks
        raise ParameterError(f"none of the {n} images of the training data has a usable mask")

    def _skip(self, i: int, reason: str) -> None:
        self._bad.add(i)
        log.warning("skipped %s: %s", self.source.name(i), reason)
        self._write({"item": self.source.name(i), "reason": reason})

    def _write(self, record: Dict[str, str]) -> None:
        if self.report:
            with open(self.report, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")
