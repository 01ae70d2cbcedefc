"""MAE pre-training on the shared loop: the data (augmented images + per-sample masking noise), the loss, and the
reconstruction pictures (original | masked | reconstruction | reconstruction with the visible patches pasted).

SAMI (EfficientSAM): with target 'teacher-features' the decoder predicts, for each masked patch, a teacher SAM
encoder's embedding (after its neck: the 256-channel map the mask decoder reads) instead of the pixels. The teacher
sees the same augmented image, resized to its input size, and its embedding is average-pooled to the MAE's token
grid (64x64 -> 14x14 at 1024 / 224). It runs on every step (the augmentation changes every image every epoch)."""
from __future__ import annotations

import dataclasses
import os
from typing import Dict, List, Optional

import numpy as np
import torch
from PIL import Image
from torch import nn

import torch.nn.functional as F

from ..checkpoints.files import atomic_write
from ..config import mae_preset
from ..data.preprocess import PIXEL_MEAN, PIXEL_STD
from ..modeling.encoder import ImageEncoder
from ..modeling.mae import MaskedAutoencoder
from ..runtime import is_main_process
from .data import IMAGENET_MEAN, IMAGENET_STD, ImageFiles, TrainImages, centre_crop, open_source
from .launch import autocast, check_precision
from .loop import TrainConfig, train
from .settings import MAETask, task_record
from .validate import Validation, check_val_data, held_out_means

BAD_IMAGES_FILE = "bad_images.jsonl"
BEST_FILE = "best.pt"  # the best validation's MaskedAutoencoder state dict (samvit train export-encoder reads it)


class MAEImages(TrainImages):
    """Training images plus the masking noise of each sample, drawn from the sample's own generator: the masks a
    step uses do not depend on how the batch is split over processes, nor on a resume."""

    def __init__(self, source, img_size: int, num_patches: int, seed: int = 0, report: Optional[str] = None) -> None:
        super().__init__(source, img_size, seed, report)
        self.num_patches = num_patches

    def make_sample(self, rgb: np.ndarray, g: torch.Generator, index: int) -> Dict[str, torch.Tensor]:
        sample = super().make_sample(rgb, g, index)
        sample["noise"] = torch.rand(self.num_patches, generator=g)
        return sample


class HeldOutImages(MAEImages):
    """Validation images: no augmentation (centre crop), and the masking noise of the image's own generator, so
    every validation masks the same patches."""

    def make_sample(self, rgb: np.ndarray, g: torch.Generator, index: int) -> Dict[str, torch.Tensor]:
        return {"image": centre_crop(rgb, self.img_size), "noise": torch.rand(self.num_patches, generator=g),
                "index": torch.tensor(index)}


def mae_validation(cfg: TrainConfig, loss_fn, img_size: int, num_patches: int) -> Validation:
    """The held-out loss (the training loss, same mask ratio, on HeldOutImages of cfg.val_data); best: the lowest;
    best.pt: the model's state dict."""
    data = check_val_data(cfg.val_data, (cfg.task.get("data"),), cfg.out)
    images = HeldOutImages(ImageFiles(data, "--val-data"), img_size, num_patches, cfg.seed)

    def run(model: nn.Module) -> Dict[str, float]:
        return held_out_means(model, images, cfg.batch_size, cfg.val_limit, cfg.precision,
                              lambda m, batch: {"loss": loss_fn(m, batch)})

    def save_best(model: nn.Module) -> List[str]:
        path = os.path.join(cfg.out, BEST_FILE)
        with atomic_write(path) as tmp:
            torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)
        return [path]

    return Validation(run, "loss", False, save_best, {"val_data": data, "val_limit": cfg.val_limit})


def mae_loss(mask_ratio: Optional[float] = None):
    """loss_fn(model, batch) for the loop: MAE's masked-patch loss with the batch's masking noise."""

    def loss_fn(model: nn.Module, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        loss, _, _ = model(batch["image"], mask_ratio, noise=batch["noise"])
        return loss

    return loss_fn


@torch.no_grad()
def teacher_targets(teacher: ImageEncoder, images: torch.Tensor, grid: int) -> torch.Tensor:
    """A teacher's embeddings of MAE-normalised images (B,3,S,S), at the MAE token grid: (B, grid*grid, C). The
    images go back to 0-255, are resized to the teacher's input (bilinear) and normalised as SAM does; the
    teacher's output (after its neck if it has one) is average-pooled to grid x grid."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    x = (images.float() * std + mean) * 255
    x = F.interpolate(x, size=teacher.config.img_size, mode="bilinear", align_corners=False)
    x = (x - torch.tensor(PIXEL_MEAN, device=x.device).view(1, 3, 1, 1)) / torch.tensor(
        PIXEL_STD, device=x.device).view(1, 3, 1, 1)
    out = teacher(x.to(teacher.dtype)).float()
    if teacher.config.out_chans is None:  # no neck: (B,G,G,C) features
        out = out.permute(0, 3, 1, 2)
    return F.adaptive_avg_pool2d(out, grid).flatten(2).transpose(1, 2)


def sami_loss(teacher: ImageEncoder, grid: int, mask_ratio: Optional[float] = None):
    """loss_fn(model, batch) for the loop: the masked patches' predictions against the teacher's features."""

    def loss_fn(model: nn.Module, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        images = batch["image"]
        if teacher.device != images.device:
            teacher.to(images.device)
        target = teacher_targets(teacher, images, grid)
        loss, _, _ = model(images, mask_ratio, noise=batch["noise"], target=target)
        return loss

    return loss_fn


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    """(3,H,W) ImageNet-normalised -> (H,W,3) uint8."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x.float().cpu() * std + mean).clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).numpy()


@torch.no_grad()
def reconstruction_picture(model: MaskedAutoencoder, images: torch.Tensor, noise: torch.Tensor,
                           mask_ratio: Optional[float] = None, precision: str = "fp32") -> Image.Image:
    """One row per image: original | masked (masked patches grey) | reconstruction | reconstruction with the
    visible patches pasted. With norm_pix_loss the predicted patches are shown with each original patch's mean
    and variance (the model predicts normalised patches)."""
    device = next(model.parameters()).device
    images, noise = images.to(device), noise.to(device)
    with autocast(device, precision):
        _, pred, mask = model(images, mask_ratio, noise=noise)
    pred = pred.float()
    if model.config.norm_pix_loss:
        target = model.patchify(images)
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        pred = pred * (var + 1.0e-6) ** 0.5 + mean
    recon = model.unpatchify(pred)
    p = model.config.patch_size
    m = model.unpatchify(mask.unsqueeze(-1).repeat(1, 1, p * p * model.config.in_chans))  # 1 = masked
    grey = torch.tensor([(0.5 - mu) / sd for mu, sd in zip(IMAGENET_MEAN, IMAGENET_STD)], device=device)
    masked = images * (1 - m) + grey.view(1, 3, 1, 1) * m
    pasted = images * (1 - m) + recon * m
    s, gap = images.shape[-1], 4
    canvas = np.full((len(images) * (s + gap) - gap, 4 * (s + gap) - gap, 3), 255, dtype=np.uint8)
    for r in range(len(images)):
        for c, panel in enumerate((images[r], masked[r], recon[r], pasted[r])):
            canvas[r * (s + gap):r * (s + gap) + s, c * (s + gap):c * (s + gap) + s] = _to_uint8(panel)
    return Image.fromarray(canvas)


class ReconstructionPictures:
    """Hook: every `every` steps, RUN_DIR/recon_<step>.png of a fixed set of images and masks (the first n
    samples of epoch 0). Every process runs the forward (FSDP2 needs them all); the main one writes."""

    def __init__(self, dataset: MAEImages, run_dir: str, every: int, n: int = 4, mask_ratio: Optional[float] = None,
                 precision: str = "fp32") -> None:
        self.dataset, self.n, self.run_dir, self.every = dataset, n, run_dir, every
        self.mask_ratio, self.precision = mask_ratio, precision
        self.images = self.noise = None

    def __call__(self, step: int, model: nn.Module) -> None:
        if self.every <= 0 or step % self.every:
            return
        if self.images is None:
            samples = [self.dataset[(0, i % len(self.dataset))] for i in range(self.n)]
            self.images = torch.stack([s["image"] for s in samples])
            self.noise = torch.stack([s["noise"] for s in samples])
        picture = reconstruction_picture(model, self.images, self.noise, self.mask_ratio, self.precision)
        if is_main_process():
            path = os.path.join(self.run_dir, f"recon_{step:08d}.png")
            with atomic_write(path) as tmp:
                picture.save(tmp, format="PNG")


def pretrain_mae(cfg: TrainConfig, task: Optional[MAETask] = None, **settings) -> Dict:
    """MAE pre-training with `task`'s settings (or MAETask(**settings); settings also replace fields of task); see
    TrainConfig. target 'teacher-features' with a teacher is SAMI: see the module doc."""
    task = MAETask(**settings) if task is None else dataclasses.replace(task, **settings)
    mae_cfg = mae_preset(task.model)
    task = dataclasses.replace(  # as the run's identity records it: absolute paths, the preset's mask ratio
        task, data=os.path.abspath(task.data) if task.data != "synthetic" else task.data,
        mask_ratio=task.mask_ratio if task.mask_ratio is not None else mae_cfg.mask_ratio,
        teacher=os.path.abspath(task.teacher) if task.teacher and os.path.exists(task.teacher) else task.teacher)
    derived = {}
    teacher_model = None
    if task.teacher is not None:
        from ..checkpoints.load import load_encoder
        from ..checkpoints.registry import checkpoint_sha256, resolve_checkpoint

        path = resolve_checkpoint(task.teacher)
        teacher_model = load_encoder(checkpoint=path, dtype=torch.float32).requires_grad_(False)
        derived["teacher_sha256"] = checkpoint_sha256(path)
    identity, extra = task_record(task, **derived)
    cfg = dataclasses.replace(cfg, task=identity, task_extra=extra)  # the task's settings: the run's identity
    check_precision(cfg.precision, mae_cfg, cfg.fsdp)  # before building a model that may be refused
    source = open_source(task.data, mae_cfg.img_size, task.synthetic_size)
    report = os.path.join(cfg.out, BAD_IMAGES_FILE)
    dataset = MAEImages(source, mae_cfg.img_size, mae_cfg.num_patches, cfg.seed, report)
    hooks: List = []
    if task.vis_every > 0:
        hooks.append(ReconstructionPictures(dataset, cfg.out, task.vis_every, mask_ratio=task.mask_ratio,
                                            precision=cfg.precision))
    if teacher_model is None:
        build, loss_fn = (lambda: MaskedAutoencoder(mae_cfg)), mae_loss(task.mask_ratio)
    else:
        tc = teacher_model.config
        width = tc.out_chans or tc.embed_dim
        build = lambda: MaskedAutoencoder(mae_cfg, target_dim=width)  # noqa: E731
        loss_fn = sami_loss(teacher_model, mae_cfg.grid_size, task.mask_ratio)
    validation = mae_validation(cfg, loss_fn, mae_cfg.img_size, mae_cfg.num_patches) if cfg.val_data else None
    return train(cfg, build, dataset, loss_fn, hooks, validation)
