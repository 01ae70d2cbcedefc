"""Decoupled distillation (MobileSAM) on the shared loop: a small encoder learns the teacher's image embeddings.

The teacher's embeddings come from an EmbeddingStore (`samvit embed --store`, or computed once into
RUN_DIR/teacher_store by the embed pipeline), never per step or epoch. So the student sees exactly the images the
teacher saw, preprocessed as SAM does: no augmentation (a crop or flip would make the stored embedding wrong).
Outputs: RUN_DIR/student.safetensors (samvit.load_encoder) and RUN_DIR/sam_student.pth, a full SAM checkpoint in
the official layout (the student's image_encoder.* with the teacher's prompt_encoder.* and mask_decoder.*).
With cfg.val_data: the held-out MSE and cosine to the teacher's embeddings of those images (read from the
--teacher-store when it holds them, else computed once into RUN_DIR/val_teacher_store), and the best student (lowest
MSE) as RUN_DIR/best_student.safetensors and best_sam_student.pth.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import Dataset

from ..checkpoints.files import atomic_write, read_checkpoint, sha256_file
from ..checkpoints.keymaps import DECODER_PREFIXES, ENCODER_PREFIX, to_official
from ..checkpoints.load import build_encoder, checkpoint_info, load_encoder, save_encoder
from ..checkpoints.registry import checkpoint_sha256, resolve_checkpoint
from ..config import AnyEncoderConfig, EncoderConfig, encoder_config_from_dict, preset
from ..data.preprocess import preprocess
from ..data.sources import collect_inputs
from ..embeddings.pipeline import StoreSink, embed
from ..embeddings.store import EmbeddingStore
from ..runtime import is_main_process
from .ckpt import latest_checkpoint
from .loop import CONFIG_FILE, TrainConfig, train
from .settings import DistillTask, task_record
from .shapes import SyntheticShapes
from .validate import Validation, check_val_data, held_out_means

STORE_DIR = "teacher_store"
VAL_STORE_DIR = "val_teacher_store"  # the teacher's embeddings of --val-data, when --teacher-store lacks them
BEST_PREFIX = "best_"  # best_student.safetensors, best_sam_student.pth
IMAGES_DIR = "images"  # --data synthetic: the pictures, written once as PNG (the store's inputs)
STUDENT_FILE = "student.safetensors"
SAM_FILE = "sam_student.pth"
log = logging.getLogger("samvit.train")


def student_config(student: Union[str, AnyEncoderConfig], teacher: EncoderConfig) -> AnyEncoderConfig:
    """The student's config (a preset name: vit_t, vit_s, tinyvit (MobileSAM's TinyViT-5M), ...; a JSON file of
    EncoderConfig or TinyViTConfig fields; or a config), at the teacher's input size; its embedding must have the
    teacher's shape."""
    if isinstance(student, str) and student.endswith(".json"):
        with open(student, encoding="utf-8") as fh:
            student = encoder_config_from_dict(json.load(fh))
    if student == "tinyvit":
        student = "tinyvit_5m"
    cfg = preset(student) if isinstance(student, str) else student
    if cfg.img_size != teacher.img_size:
        cfg = dataclasses.replace(cfg, img_size=teacher.img_size)
    if cfg.grid_size != teacher.grid_size:
        raise ValueError(f"--student {cfg.name}: its {cfg.grid_size}x{cfg.grid_size} embedding grid is not the "
                         f"teacher's {teacher.grid_size}x{teacher.grid_size}")
    if cfg.out_chans != teacher.out_chans:
        raise ValueError(f"--student {cfg.name}: its embedding has {cfg.out_chans} channels, the teacher's "
                         f"{teacher.out_chans}; they must match (the teacher's decoder reads it)")
    return cfg


def synthetic_images(folder: str, n: int, size: int, seed: int = 0) -> None:
    """Write the synthetic shapes 0..n-1 as PNG files into folder (those already there are kept)."""
    os.makedirs(folder, exist_ok=True)
    shapes = SyntheticShapes(n, size=size, seed=seed, cache=0)
    for i in range(n):
        path = os.path.join(folder, f"shapes_{i:06d}.png")
        if not os.path.exists(path):
            with atomic_write(path) as tmp:
                Image.fromarray(shapes.load(i)).save(tmp, format="PNG")


class DistillImages(Dataset):
    """(image preprocessed as SAM does, the teacher's stored embedding) per training image; keys (epoch, index)."""

    def __init__(self, items: List[Tuple[str, str]], store: EmbeddingStore, img_size: int) -> None:
        self.items, self.store, self.img_size = items, store, img_size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key) -> Dict[str, torch.Tensor]:
        index = key[1] if isinstance(key, tuple) else key
        path, name = self.items[index]
        return {"image": preprocess(path, self.img_size).tensor, "target": self.store.get(name).float(),
                "index": torch.tensor(index)}


def distill_loss(cosine_weight: float = 0.0):
    """loss_fn(model, batch): MSE to the teacher's embedding, plus cosine_weight x (1 - per-position cosine)."""

    def loss_fn(model: nn.Module, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        pred, target = model(batch["image"]).float(), batch["target"]
        mse = F.mse_loss(pred, target)
        cos = F.cosine_similarity(pred, target, dim=1).mean()
        loss = mse + cosine_weight * (1 - cos) if cosine_weight else mse
        return {"loss": loss, "mse": mse.detach(), "cosine": cos.detach()}

    return loss_fn


def teacher_store(teacher_path: str, teacher_sha: str, items: List[Tuple[str, str]], store_path: Optional[str],
                  run_dir: str, batch_size: int, quiet: bool, name: str = STORE_DIR) -> EmbeddingStore:
    """The store of the teacher's embeddings: `store_path` as given (checked: same teacher, every image there with
    the same content), else RUN_DIR/<name>, filled once by the embed pipeline (a resumed run reuses it)."""
    if store_path is None:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            what = "the teacher's embeddings of --data and --val-data" if name == VAL_STORE_DIR else "STORE"
            raise ValueError(f"under torchrun pass --teacher-store {what}, made beforehand with `samvit embed DIR "
                             "--store STORE --checkpoint TEACHER` (the processes would each compute it)")
        store_path = os.path.join(run_dir, name)
        teacher = load_encoder(checkpoint=teacher_path, dtype=torch.float32)
        report = embed(teacher, items, StoreSink(store_path, teacher_sha, dtype="float32"), batch_size=batch_size,
                       workers=0, progress=False if quiet else None)
        if report.failed:
            log.warning("%d images could not be embedded by the teacher and are left out (see %s)",
                        len(report.failed), os.path.join(store_path, "failures.jsonl"))
        return EmbeddingStore.open(store_path)
    store = EmbeddingStore.open(store_path)
    if store.tiled:
        raise ValueError(f"--teacher-store {store_path}: holds tiled embeddings; distillation needs whole images")
    if store.identity["checkpoint_sha256"] != teacher_sha:
        raise ValueError(f"--teacher-store {store_path}: made with another checkpoint (sha256 "
                         f"{store.identity['checkpoint_sha256'][:16]}...) than --teacher ({teacher_sha[:16]}...)")
    missing = [k for _, k in items if k not in store]
    stale = [k for p, k in items if k in store and store.record(k)["sha256"] != sha256_file(p)]
    if missing or stale:
        raise ValueError(f"--teacher-store {store_path}: {len(missing)} training images are not in it and "
                         f"{len(stale)} changed since (e.g. {(missing + stale)[:3]}); update it with `samvit embed "
                         "DIR --store STORE`")
    return store


def write_outputs(run_dir: str, cfg: AnyEncoderConfig, teacher_path: str, teacher_sha: str,
                  state: Optional[Dict[str, torch.Tensor]] = None, prefix: str = "") -> List[str]:
    """<prefix>student.safetensors and (when the teacher is a full SAM checkpoint) <prefix>sam_student.pth from the
    student's state dict (default: the run's newest checkpoint's); returns the paths written."""
    student = build_encoder(cfg)
    student.load_state_dict(state if state is not None else latest_checkpoint(run_dir)["model"], strict=True)
    path = os.path.join(run_dir, prefix + STUDENT_FILE)
    save_encoder(student, path, {"distilled_from_sha256": teacher_sha})
    written = [path]
    sd = to_official(read_checkpoint(teacher_path)[0])
    decoder = {k: v for k, v in sd.items() if k.startswith(DECODER_PREFIXES)}
    if not decoder:
        log.warning("the teacher %s holds no prompt_encoder.* / mask_decoder.*: no %s written", teacher_path,
                    prefix + SAM_FILE)
        return written
    full = {ENCODER_PREFIX + k: v.detach().clone() for k, v in student.state_dict().items()}
    full.update({k: v.clone() for k, v in decoder.items()})
    out = os.path.join(run_dir, prefix + SAM_FILE)
    with atomic_write(out) as tmp:
        torch.save(full, tmp)
    return written + [out]


def distill_validation(cfg: TrainConfig, scfg: AnyEncoderConfig, teacher_path: str, teacher_sha: str,
                       items: List[Tuple[str, str]], store: EmbeddingStore) -> Validation:
    """The held-out MSE and cosine of the student to the teacher's embeddings of `items` (in `store`); best: the
    lowest MSE; best_student.safetensors and best_sam_student.pth."""
    def metrics(model: nn.Module, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        out = distill_loss()(model, batch)
        return {"mse": out["mse"], "cosine": out["cosine"]}

    images = DistillImages(items, store, scfg.img_size)

    def run(model: nn.Module) -> Dict[str, float]:
        return held_out_means(model, images, cfg.batch_size, cfg.val_limit, cfg.precision, metrics)

    def save_best(model: nn.Module) -> List[str]:
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        return write_outputs(cfg.out, scfg, teacher_path, teacher_sha, state, BEST_PREFIX)

    return Validation(run, "mse", False, save_best, {"val_data": os.path.abspath(cfg.val_data),
                                                     "val_limit": cfg.val_limit})


def val_store(items: List[Tuple[str, str]], teacher_path: str, teacher_sha: str, given_store: Optional[str],
              run_dir: str, batch_size: int, quiet: bool) -> EmbeddingStore:
    """The teacher's embeddings of the --val-data images: the --teacher-store when it holds every one of them
    unchanged, else RUN_DIR/val_teacher_store (computed once)."""
    if given_store is not None:
        store = EmbeddingStore.open(given_store)
        if all(k in store and store.record(k)["sha256"] == sha256_file(p) for p, k in items):
            return store
    return teacher_store(teacher_path, teacher_sha, items, None, run_dir, batch_size, quiet, VAL_STORE_DIR)


def distill(cfg: TrainConfig, task: Optional[DistillTask] = None, **settings) -> Dict:
    """Distil a teacher into a student with `task`'s settings (or DistillTask(**settings); settings also replace
    fields of task); see TrainConfig for the rest. Returns the loop's summary plus 'outputs'."""
    task = DistillTask(**settings) if task is None else dataclasses.replace(task, **settings)
    teacher_path = resolve_checkpoint(task.teacher)
    teacher_cfg = checkpoint_info(teacher_path)["config"]
    scfg = student_config(task.student, teacher_cfg)
    if scfg.out_chans is None:
        raise ValueError(f"--student {scfg.name}: has no neck; distillation matches the (C,H,W) embedding")
    teacher_sha = checkpoint_sha256(teacher_path)
    out = cfg.out
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out}: exists and is not a directory")
    if os.path.isdir(out) and os.listdir(out) and not os.path.exists(os.path.join(out, CONFIG_FILE)):
        raise ValueError(f"--out {out}: exists, is not empty and holds no run ({CONFIG_FILE}); choose another --out")
    if task.teacher_store is not None and not os.path.isdir(task.teacher_store):
        raise ValueError(f"--teacher-store {task.teacher_store}: no such store (make it with `samvit embed DIR "
                         "--store STORE --checkpoint TEACHER`)")
    if task.data == "synthetic":
        folder = os.path.join(out, IMAGES_DIR)
        synthetic_images(folder, task.synthetic_size, teacher_cfg.img_size, cfg.seed)
        items = collect_inputs([folder])
    else:
        items = collect_inputs([task.data])
        if not items:
            raise ValueError(f"--data {task.data}: no images found")
    held_out: List[Tuple[str, str]] = []
    if cfg.val_data:  # checked before the teacher embeds anything
        held_out = collect_inputs([check_val_data(cfg.val_data, (task.data,), out)])[:cfg.val_limit or None]
        if not held_out:
            raise ValueError(f"--val-data {cfg.val_data}: no images found")
    store = teacher_store(teacher_path, teacher_sha, items, task.teacher_store, out, task.embed_batch_size, cfg.quiet)
    items = [(p, k) for p, k in items if k in store]
    validation = None
    if held_out:
        v_store = val_store(held_out, teacher_path, teacher_sha, task.teacher_store, out, task.embed_batch_size,
                            cfg.quiet)
        held_out = [(p, k) for p, k in held_out if k in v_store]
        if not held_out:
            raise ValueError(f"--val-data {cfg.val_data}: the teacher embedded none of its images")
        validation = distill_validation(cfg, scfg, teacher_path, teacher_sha, held_out, v_store)
    task = dataclasses.replace(  # as the run's identity records it: absolute paths, the student's config
        task, student=scfg, data=os.path.abspath(task.data) if task.data != "synthetic" else task.data,
        teacher=os.path.abspath(task.teacher) if os.path.exists(task.teacher) else task.teacher,
        teacher_store=os.path.abspath(task.teacher_store) if task.teacher_store else None)  # None: RUN_DIR's
    identity, extra = task_record(task, teacher_sha256=teacher_sha)
    made = tuple(n for n in (IMAGES_DIR, STORE_DIR, VAL_STORE_DIR) if os.path.exists(os.path.join(out, n)))
    cfg = dataclasses.replace(cfg, task=identity, task_extra=extra, inputs=made)
    result = train(cfg, lambda: build_encoder(scfg), DistillImages(items, store, scfg.img_size),
                   distill_loss(task.cosine_weight), validation=validation)
    if is_main_process():  # the loop's process group is gone once train() returns
        result["outputs"] = write_outputs(out, scfg, teacher_path, teacher_sha)
        if not cfg.quiet:
            print("samvit train distill: wrote " + ", ".join(result["outputs"]))
    return result
