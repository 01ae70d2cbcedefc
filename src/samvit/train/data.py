"""Training data: image sources (folders, synthetic shapes), the MAE augmentation, and a resumable, distributed
batch stream.

Every random draw of a sample comes from its own generator seeded by (seed, epoch, index), so the data a step sees
does not depend on DataLoader workers, on the number of processes or on where a run was resumed.
"""
from __future__ import annotations

import json
import logging
import math
import os
from typing import Dict, Optional, Set, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ..data.sources import collect_inputs
from ..data.images import ImageError, load_image
from .shapes import SyntheticShapes

# MAE normalises with the ImageNet mean/std of 0-1 pixels (main_pretrain.py), not SAM's 0-255 constants.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

log = logging.getLogger("samvit.train")


class ImageFiles:
    """The image files under a folder (recursive, stable order), decoded by samvit.load_image."""

    def __init__(self, root: Union[str, os.PathLike], flag: str = "--data") -> None:
        root = os.fspath(root)
        if not os.path.isdir(root):
            raise FileNotFoundError(f"{flag} {root!r}: no such directory (expected a folder of images, "
                                    "searched recursively" + (", or 'synthetic')" if flag == "--data" else ")"))
        self.root = root
        self.paths = [p for p, _ in collect_inputs([root])]
        if not self.paths:
            raise ValueError(f"{flag} {root!r}: no images found (searched recursively for "
                             ".jpg/.jpeg/.png/.bmp/.tif/.tiff/.webp/.gif/.ppm/.pgm)")

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> np.ndarray:
        """Image `index` as (H,W,3) uint8 RGB; ImageError when it cannot be decoded."""
        return load_image(self.paths[index])

    def name(self, index: int) -> str:
        return self.paths[index]


def open_source(data: str, img_size: int, synthetic_size: int = 1024, seed: int = 0
                ) -> Union[ImageFiles, SyntheticShapes]:
    """--data: 'synthetic' (synthetic_size pictures of shapes at img_size) or a folder of images."""
    if data == "synthetic":
        return SyntheticShapes(synthetic_size, size=img_size, seed=seed)
    return ImageFiles(data)


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The generator of every random draw for sample `index` in `epoch`."""
    mixed = np.random.SeedSequence([seed, epoch, index]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(mixed[0]) << 31 ^ int(mixed[1]))


def random_resized_crop_params(height: int, width: int, g: torch.Generator,
                               scale: Tuple[float, float] = (0.2, 1.0),
                               ratio: Tuple[float, float] = (3 / 4, 4 / 3)) -> Tuple[int, int, int, int]:
    """(top, left, h, w) of a random crop: torchvision's RandomResizedCrop.get_params, drawing from g."""
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=g).item()
        aspect = math.exp(torch.empty(1).uniform_(log_ratio[0].item(), log_ratio[1].item(), generator=g).item())
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,), generator=g).item())
            left = int(torch.randint(0, width - w + 1, size=(1,), generator=g).item())
            return top, left, h, w
    in_ratio = width / height  # fallback: the central crop of the nearest allowed aspect ratio
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def mae_augment(rgb: np.ndarray, size: int, g: torch.Generator) -> torch.Tensor:
    """MAE's training transform: RandomResizedCrop(size, scale 0.2-1, bicubic), horizontal flip at p=0.5,
    to 0-1 floats, ImageNet mean/std. (H,W,3) uint8 -> (3,size,size) float32."""
    top, left, h, w = random_resized_crop_params(rgb.shape[0], rgb.shape[1], g)
    img = Image.fromarray(rgb).crop((left, top, left + w, top + h)).resize((size, size), Image.BICUBIC)
    if torch.rand(1, generator=g).item() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1).float().div(255)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return x.sub_(mean).div_(std)


def centre_crop(rgb: np.ndarray, size: int) -> torch.Tensor:
    """The evaluation transform (no randomness): shorter side resized to size (bicubic), the centre size x size
    crop, to 0-1 floats, ImageNet mean/std. (H,W,3) uint8 -> (3,size,size) float32."""
    h, w = rgb.shape[:2]
    s = size / min(h, w)
    nh, nw = max(size, round(h * s)), max(size, round(w * s))
    top, left = (nh - size) // 2, (nw - size) // 2
    img = Image.fromarray(rgb).resize((nw, nh), Image.BICUBIC).crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1).float().div(255)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return x.sub_(mean).div_(std)


class TrainImages(Dataset):
    """Augmented training images from a source (ImageFiles, SyntheticShapes: len, load(i), name(i)).

    Keys are (epoch, index). An image that cannot be decoded is logged (and appended to `report` as a JSON line)
    and replaced by the next decodable one, so a batch keeps its size and the run goes on.
    """

    def __init__(self, source, img_size: int, seed: int = 0, report: Optional[str] = None) -> None:
        self.source, self.img_size, self.seed, self.report = source, img_size, seed, report
        self._bad: Set[int] = set()

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: Union[int, Tuple[int, int]]) -> Dict[str, torch.Tensor]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        g = sample_generator(self.seed, epoch, index)
        return self.make_sample(self._load(index), g, index)

    def make_sample(self, rgb: np.ndarray, g: torch.Generator, index: int) -> Dict[str, torch.Tensor]:
        """The sample dict of one decoded image (subclasses add what their loss needs, drawing from g)."""
        return {"image": mae_augment(rgb, self.img_size, g), "index": torch.tensor(index)}

    def _load(self, index: int) -> np.ndarray:
        n = len(self.source)
        for k in range(n):
            i = (index + k) % n
            if i in self._bad:
                continue
            try:
                return self.source.load(i)
            except ImageError as e:
                self._bad.add(i)
                self._report(self.source.name(i), str(e))
        raise ImageError(f"none of the {n} images of the training data could be decoded")

    def _report(self, name: str, error: str) -> None:
        log.warning("skipped a bad image: %s", error)
        if self.report:
            with open(self.report, "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"path": name, "error": error}) + "\n")


class EpochSampler(DistributedSampler):
    """DistributedSampler (shuffled, seeded, padded to a multiple of the processes) that yields (epoch, index)
    keys and can start part-way into an epoch."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self.start = 0

    def __iter__(self):
        epoch = self.epoch
        return ((epoch, i) for i in list(super().__iter__())[self.start:])

    def __len__(self) -> int:
        return self.num_samples - self.start


class Batches:
    """An endless stream of batches over epochs; (epoch, pos) is where it stands (pos = batches already taken
    in this epoch, on each process), and a stream built with the same (epoch, pos) continues identically.

    With num_workers > 0 the DataLoader's worker processes are persistent: forked once, by start() (the loop calls
    it before the model is built), so that they never inherit the memory the training steps grow (samvit's
    allocator keeps freed memory mapped, and a worker forked later would hold a copy of it)."""

    def __init__(self, dataset: Dataset, batch_size: int, world: int = 1, rank: int = 0, seed: int = 0,
                 num_workers: int = 0, epoch: int = 0, pos: int = 0, pin_memory: bool = False) -> None:
        self.dataset, self.batch_size, self.num_workers = dataset, batch_size, num_workers
        self.pin_memory = pin_memory
        self.sampler = EpochSampler(dataset, world, rank, seed)
        self.per_epoch = self.sampler.num_samples // batch_size
        if self.per_epoch == 0:
            raise ValueError(f"the training data holds {len(dataset)} images, fewer than one batch "
                             f"({batch_size} per process x {world} processes)")
        self.epoch, self.pos = epoch, pos
        self._loader: Optional[DataLoader] = None
        self._it = None
        self._at: Optional[Tuple[int, int]] = None  # (epoch, pos) where the current iterator started
        self._taken = 0  # batches taken from the current iterator

    def __iter__(self) -> "Batches":
        return self

    def start(self) -> "Batches":
        """Fork the worker processes now (and start reading at (epoch, pos)); a no-op without workers."""
        if self.num_workers and self._it is None:
            self._open()
        return self

    def _open(self) -> None:
        self.sampler.set_epoch(self.epoch)
        self.sampler.start = min(self.pos, self.per_epoch) * self.batch_size
        if self._loader is None:
            workers = self.num_workers
            self._loader = DataLoader(self.dataset, self.batch_size, sampler=self.sampler, drop_last=True,
                                      num_workers=workers, pin_memory=self.pin_memory,
                                      persistent_workers=workers > 0)
        self._it = iter(self._loader)  # persistent workers: the same processes, reset to the new indices
        self._at, self._taken = (self.epoch, self.pos), 0

    def __next__(self) -> Dict[str, torch.Tensor]:
        if self._it is not None and self._taken == 0 and self._at != (self.epoch, self.pos):
            self._it = None  # started early, then moved (a resume): read from the new position
        if self._it is None:
            self._open()
        try:
            batch = next(self._it)
        except StopIteration:
            self.epoch, self.pos, self._it = self.epoch + 1, 0, None
            return next(self)
        self.pos += 1
        self._taken += 1
        return batch

def to_device(batch: Dict[str, torch.Tensor], device: torch.device) -> Dict[str, torch.Tensor]:
    """Every tensor of a batch dict on `device`."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

