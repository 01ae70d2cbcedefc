"""`samvit train`: MAE pre-training of the encoder (`train mae`), the MAE encoder -> SAM ImageEncoder transfer
(`train export-encoder`), fine-tuning SAM on masks (`train sam`, docs/finetune.md) and distillation into a small
encoder (`train distill`, docs/experiments.md).

One machine: `samvit train mae ...`; several processes or machines: `torchrun --nproc_per_node=N -m samvit train
mae ...` (DDP; --fsdp shards the model instead). See docs/training.md.
"""
from __future__ import annotations

import argparse
import os
from typing import Optional, Tuple

from ..config import MAE_PRESETS
from ..train.settings import TARGETS, DistillTask, MAETask, SamTask, default
from .options import (ENCODER_PRESETS, REGISTRY, RELEASED, SAM_FILE, VIT_PRESETS, add_device, add_model, add_quiet,
                      encoder_spec)

MAE_MODELS = tuple(MAE_PRESETS)

HELP = "MAE pre-training, distillation, fine-tuning SAM on masks (one process or torchrun); export to SAM"


def _default(cls, name: str) -> str:
    """A settings dataclass field's default, as the help prints it."""
    value = default(cls, name)
    return ",".join(value) if isinstance(value, tuple) else str(value)


def add_arguments(p: argparse.ArgumentParser) -> None:
    # The task options default to None, "not given": the defaults are the fields' of MAETask, SamTask and
    # DistillTask (samvit.train.settings) and TrainConfig's, applied by run_settings after a --config file.
    sub = p.add_subparsers(dest="train_command", metavar="TASK")
    m = sub.add_parser("mae", help="MAE pre-training of the ViT encoder on a folder of images (or synthetic shapes)",
                       description="MAE pre-training (He et al. 2022) of the ViT encoder: 75% of each image's "
                       "patches masked, the visible ones encoded, the pixels of the masked ones reconstructed. Runs "
                       "as one process or under torchrun (DDP; --fsdp for FSDP2). Writes RUN_DIR/log.jsonl, "
                       "checkpoints (ckpt_<step>.pt, the last --keep-last kept) and reconstruction pictures.")
    m.add_argument("--data", metavar="DIR|synthetic", help="folder of training images (searched recursively), or "
                   "'synthetic' for a generated set of shapes (tests and demos); required, here or in --config")
    m.add_argument("--model", choices=MAE_MODELS, help="MAE preset (mae_tiny: width 64, for demos); required, here "
                   "or in --config")
    o, r, g = add_loop_arguments(m, blr=MAETask.BLR, blr_note="MAE's", fp16_refused="mae_vit_h",
                                 synthetic_size=default(MAETask, "synthetic_size"))
    o.add_argument("--mask-ratio", type=float, help="fraction of patches masked (default: the preset's, 0.75)")
    o.add_argument("--target", choices=TARGETS, help="what the decoder reconstructs for the masked patches: their "
                   "pixels (MAE) or --teacher's embedding after its neck, pooled to the token grid (SAMI, "
                   f"EfficientSAM) (default {_default(MAETask, 'target')})")
    o.add_argument("--teacher", metavar="vit_h|PATH", help="with --target teacher-features: the teacher SAM encoder "
                   "(registry name or checkpoint file)")
    g.add_argument("--vis-every", type=int, metavar="K", help="write RUN_DIR/recon_<step>.png every K steps "
                   f"(default {_default(MAETask, 'vis_every')}: off)")

    f = sub.add_parser("sam", help="fine-tune SAM on masks (full, frozen parts, LoRA, or decoder-only from an "
                       "embedding store)",
                       description="Fine-tune a SAM checkpoint on instance masks with SAM's simulated interactive "
                       "prompts (a point or a noisy box, then correction clicks with the previous logits as the mask "
                       "prompt; 20 x focal + dice + IoU MSE). Runs as one process or under torchrun (DDP; --fsdp "
                       "for FSDP2). Writes RUN_DIR/log.jsonl, checkpoints, and at the end RUN_DIR/final.pth (the "
                       "official segment-anything layout, LoRA merged) and RUN_DIR/final.safetensors.")
    f.add_argument("--data", metavar="DIR|ANN.json|synthetic",
                   help="a folder with images/NAME.(png|jpg) and masks/NAME.png (0 background, each other value one "
                   "instance), a COCO annotations .json (with --images), or 'synthetic' (generated shapes); "
                   "required, here or in --config")
    f.add_argument("--images", metavar="DIR", help="the image folder of a COCO --data .json")
    f.add_argument("--checkpoint", metavar="CK", help=f"{SAM_FILE} or {REGISTRY}: the SAM model to start from; "
                   "required, here or in --config")
    add_model(f, presets=None)
    o, r, g = add_loop_arguments(f, blr=SamTask.BLR, blr_note="SAM's at batch 256", fp16_refused="vit_h",
                                 synthetic_size=default(SamTask, "synthetic_size"))
    t = f.add_argument_group("what trains, and the prompts")
    t.add_argument("--train", metavar="PARTS", help="comma-separated parts that train: encoder, prompt, decoder "
                   f"(default {_default(SamTask, 'train')})")
    t.add_argument("--lora-rank", type=int, metavar="R", help="LoRA adapters of rank R on the encoder instead of "
                   "training its weights (merged into plain weights on export; default "
                   f"{_default(SamTask, 'lora_rank')}: off)")
    t.add_argument("--lora-targets", metavar="LIST", help="the encoder layers that get adapters: qkv, proj, mlp "
                   f"(comma-separated; default {_default(SamTask, 'lora_targets')})")
    t.add_argument("--lora-alpha", type=float, help="LoRA scaling alpha (update x alpha / R; default R)")
    t.add_argument("--layer-decay", type=float, help="layer-wise lr decay of the encoder: block i gets lr x "
                   f"decay^(depth - i) (default {_default(SamTask, 'layer_decay')}: none)")
    t.add_argument("--drop-path", type=float, help="stochastic depth rate of the encoder's last block (linear from 0 "
                   f"in the first; default {_default(SamTask, 'drop_path')})")
    t.add_argument("--iterations", type=int, metavar="N", help="correction clicks after the first prompt, each from "
                   f"the error region of the previous prediction (default {_default(SamTask, 'iterations')}, SAM's; "
                   "0: the first prompt only)")
    t.add_argument("--masks-per-image", type=int, metavar="K", help="instances sampled per image per step (default "
                   f"{_default(SamTask, 'masks_per_image')})")
    t.add_argument("--store", metavar="STORE", help="decoder-only training: read the image embeddings from this "
                   "`samvit embed --store` store (computed into it where missing) instead of running the frozen "
                   "encoder")

    d = sub.add_parser("distill", help="distil a SAM encoder into a small student (MobileSAM-style)",
                       description="Decoupled distillation: the student encoder learns the teacher's image embeddings "
                       "(MSE, optionally + cosine). The teacher's embeddings are read from an embedding store "
                       "(--teacher-store, made by `samvit embed --store`) or computed once into RUN_DIR/teacher_store; "
                       "no augmentation (it would invalidate them). Writes RUN_DIR/student.safetensors (loads with "
                       "samvit.load_encoder) and RUN_DIR/sam_student.pth (the student with the teacher's prompt "
                       "encoder and mask decoder, official layout), besides the loop's log.jsonl and checkpoints.")
    d.add_argument("--teacher", metavar="vit_h|PATH", help="the teacher: a registry name "
                   f"({', '.join(RELEASED)}) or a full SAM checkpoint file (an encoder-only file gives no "
                   "sam_student.pth); required, here or in --config")
    d.add_argument("--student", metavar="PRESET|JSON", help=f"student preset ({ENCODER_PRESETS}; tinyvit: "
                   "tinyvit_5m, MobileSAM's) or a JSON file of EncoderConfig or TinyViTConfig fields (default "
                   f"{_default(DistillTask, 'student')}); its input size is the teacher's")
    d.add_argument("--data", metavar="DIR|synthetic", help="folder of training images (searched recursively), or "
                   "'synthetic' (shapes, written once to RUN_DIR/images); required, here or in --config")
    d.add_argument("--teacher-store", metavar="STORE", help="the teacher's embeddings of --data, made by `samvit "
                   "embed DIR --store STORE --checkpoint TEACHER` (default: computed once into RUN_DIR/teacher_store)")
    o, r, g = add_loop_arguments(d, blr=DistillTask.BLR, blr_note="MAE's", fp16_refused="vit_h",
                                 synthetic_size=default(DistillTask, "synthetic_size"))
    o.add_argument("--cosine-weight", type=float, metavar="W", help="loss = MSE + W x (1 - cosine per embedding "
                   f"position) (default {_default(DistillTask, 'cosine_weight')}: MSE alone)")
    g.add_argument("--embed-batch-size", type=int, metavar="B", help="batch of the teacher when it computes the "
                   f"store (default {_default(DistillTask, 'embed_batch_size')})")

    e = sub.add_parser("export-encoder", help="turn an MAE encoder into a SAM ImageEncoder (.safetensors)",
                       description="Build a SAM ImageEncoder from an MAE-trained ViT (what SAM did): patch embedding "
                       "and blocks copied, class token dropped, position embedding resized to the SAM grid, "
                       "relative-position tables zero, windows per the preset, a fresh neck. The result loads with "
                       "samvit.load_encoder.")
    e.add_argument("src", metavar="SRC", help="a `samvit train mae` run directory (its newest checkpoint), one of "
                   "its ckpt_*.pt files, or an MAE checkpoint (official mae_pretrain_vit_*.pth, transformers "
                   "ViTMAEForPreTraining)")
    e.add_argument("--preset", required=True, help="SAM encoder preset of the result "
                   f"({VIT_PRESETS}), or a JSON file of EncoderConfig fields (for other widths, e.g. a mae_tiny run)")
    e.add_argument("--out", required=True, metavar="PATH", help="output .safetensors file")
    e.add_argument("--force", action="store_true", help="replace --out if it exists (refused otherwise)")


def add_loop_arguments(m: argparse.ArgumentParser, blr: float, blr_note: str, fp16_refused: str, synthetic_size: int
                       ) -> Tuple[argparse._ArgumentGroup, argparse._ArgumentGroup, argparse._ArgumentGroup]:
    """The shared loop's options (a --config file, run directory and batch, length, optimisation,
    memory/precision/processes, logs, --data synthetic's size); returns the three option groups for the task's own
    options. None is "not given" (see run_settings); the help names TrainConfig's defaults."""
    m.add_argument("--config", metavar="FILE", help="start from the settings in FILE: YAML (.yaml, .yml) or JSON, "
                   "TrainConfig's fields (out, batch_size, steps, lr, ...) and the task's (data, model, ...), or a "
                   "run's RUN_DIR/config.json; the flags given override it (docs/training.md)")
    m.add_argument("--out", metavar="RUN_DIR", help="run directory (created; must be new unless --resume); "
                   "required, here or in --config")
    m.add_argument("--batch-size", type=int, metavar="B", help="images per process per micro-batch; required, here "
                   "or in --config")
    length = m.add_mutually_exclusive_group()  # one of them, here or in --config
    length.add_argument("--steps", type=int, metavar="N", help="train up to optimizer step N")
    length.add_argument("--epochs", type=int, metavar="E", help="train E passes over the data")
    o = m.add_argument_group("optimisation (AdamW 0.9/0.95, warmup + half-cycle cosine per step)")
    o.add_argument("--accum", type=int, metavar="K", help="gradient accumulation: micro-batches per optimizer step "
                   "(default 1); global batch = B x K x processes")
    o.add_argument("--blr", type=float, help=f"base lr: peak lr = blr x global batch / 256 (default {blr:g}, "
                   f"{blr_note})")
    o.add_argument("--lr", type=float, help="absolute peak lr (overrides --blr and --lr-floor)")
    o.add_argument("--lr-floor", type=float, metavar="LR", help="the least peak lr the --blr rule gives, for small "
                   "batches (default: the task's, printed at the start and listed in docs/training.md; 0: the rule "
                   "alone)")
    o.add_argument("--min-lr", type=float, help="lr at the end of the cosine (default 0)")
    o.add_argument("--warmup-steps", type=int, metavar="W", help="linear warmup steps (default: 10%% of the cosine's "
                   "length, 0 when there is none)")
    o.add_argument("--decay-steps", type=int, metavar="D",
                   help="the cosine reaches --min-lr at step D (default: the full run with --epochs; with --steps no "
                   "decay unless D is given, so that --steps can be raised on --resume)")
    o.add_argument("--weight-decay", type=float, help="AdamW weight decay, not on norms, biases, position embeddings "
                   "and tokens (default 0.05)")
    o.add_argument("--clip-grad", type=float, metavar="NORM", help="clip the gradient norm to NORM")
    r = m.add_argument_group("memory, precision and processes")
    r.add_argument("--checkpointing", action="store_true", default=None, help="activation checkpointing per block: "
                   "less memory, about one more forward pass of compute")
    r.add_argument("--precision", choices=("fp32", "bf16", "fp16"),
                   help=f"fp32 (default), bf16 autocast, or fp16 autocast with a gradient scaler (refused for "
                   f"{fp16_refused})")
    r.add_argument("--fsdp", action="store_true", default=None, help="shard parameters, gradients and optimizer "
                   "state over the processes (FSDP2, per block) instead of DDP; needs torchrun")
    add_device(r, torchrun=True)
    r.add_argument("--num-workers", type=int, metavar="N", help="DataLoader processes (default: 0 for synthetic data, "
                   "for train sam --store and for train distill on the CPU, else up to 8 per process; persistent, "
                   "forked before the model is built); the data is the same for any N")
    g = m.add_argument_group("run directory and logs")
    g.add_argument("--resume", action="store_true", default=None, help="continue the run in RUN_DIR from its newest "
                   "checkpoint (starts at step 0 if it has none)")
    g.add_argument("--seed", type=int, help="seed of the weights, the data order, augmentation and masks (default 0)")
    g.add_argument("--log-every", type=int, metavar="K", help="log every K steps (default 10)")
    g.add_argument("--ckpt-every", type=int, metavar="K", help="checkpoint every K steps and at the end (default "
                   "500)")
    g.add_argument("--keep-last", type=int, metavar="N", help="checkpoints kept (default 3)")
    add_quiet(g, "no progress bar and no summary lines")
    m.set_defaults(quiet=None)
    g.add_argument("--synthetic-size", type=int, metavar="N", help="images in --data synthetic (default "
                   f"{synthetic_size})")
    v = m.add_argument_group("validation (not part of the run's identity: --resume may add or change it)")
    v.add_argument("--val-data", default=None, metavar="DIR", help="held-out data, validated on the main process "
                   "(train sam: a mask folder DIR/images + DIR/masks, `samvit evaluate`'s mIoUs, best: the highest "
                   "1-point mIoU; train mae: a folder of images, the masked-patch loss, best: the lowest; train "
                   "distill: a folder of images, MSE and cosine to the teacher, best: the lowest MSE); "
                   "val_<metric> goes to log.jsonl and TensorBoard, the best model so far to RUN_DIR/best.* with "
                   "best.json (docs/training.md). Not --data nor inside it, not inside --out")
    v.add_argument("--val-every", type=int, default=None, metavar="N", help="validate every N steps and at the end "
                   "(default: at every checkpoint, --ckpt-every, and at the end); needs --val-data")
    v.add_argument("--val-limit", type=int, default=None, metavar="N", help="validate on the first N images of "
                   "--val-data (default: all; the other processes wait meanwhile)")
    return o, r, g


def run_settings(args: argparse.Namespace):
    """(TrainConfig, the task's settings) of a run: the flags given, over the --config file's settings, over the
    defaults (the dataclasses' fields; the task's --blr, --lr-floor and --num-workers). The merged values are also
    set on args."""
    import dataclasses

    from ..errors import ParameterError
    from ..train.loop import TrainConfig
    from ..train.optim import LR_FLOOR
    from ..train.settings import LOOP_INTERNAL, TASKS, read_settings, required
    from . import UserError

    cls = TASKS[args.train_command]
    loop_names = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in LOOP_INTERNAL]
    task_names = [f.name for f in dataclasses.fields(cls)]
    given = {k: getattr(args, k) for k in loop_names + task_names if getattr(args, k, None) is not None}
    from_file = read_settings(args.config, cls) if args.config else {}
    if "steps" in given or "epochs" in given:  # the run's length is one setting: a flag for it replaces the file's
        from_file = {k: v for k, v in from_file.items() if k not in ("steps", "epochs")}
    values = {**from_file, **given}
    missing = [f"--{k.replace('_', '-')}" for k in ("out", "batch_size", *required(cls)) if values.get(k) is None]
    if values.get("steps") is None and values.get("epochs") is None:
        missing.append("--steps or --epochs")
    if missing:
        raise UserError(f"missing {', '.join(missing)}: give them as flags or in a --config file")
    if cls.NAME == "sam" and isinstance(values.get("model"), str):
        values["model"] = encoder_spec(values["model"])  # a JSON file of EncoderConfig fields is read here
    vars(args).update(values)
    try:
        task = cls(**{k: v for k, v in values.items() if k in task_names})
    except ParameterError as e:
        if e.param in from_file and e.param not in given:  # name the file's setting, not a flag
            raise UserError(f"--config {args.config}: {e}") from None
        raise
    loop = {k: v for k, v in values.items() if k in loop_names and v is not None}
    loop.setdefault("blr", cls.BLR)
    if "num_workers" not in loop:  # none where a sample is cheap: synthetic data, or embeddings read from a store
        # and distill on the CPU: a picture's decode is a sliver of the student's step there, and each worker costs
        # a few hundred MiB (docs/training.md, memory)
        cheap = values["data"] == "synthetic" or values.get("store") is not None or (
            cls.NAME == "distill" and not on_cuda(values.get("device")))
        loop["num_workers"] = 0 if cheap else min(8, max(1, (os.cpu_count() or 2) //
                                                         int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    if "lr_floor" not in loop:
        loop["lr_floor"] = LR_FLOOR.get("sam_encoder" if cls.NAME == "sam" and "encoder" in task.train else cls.NAME)
    try:
        cfg = TrainConfig(**loop)
    except ValueError as e:
        if from_file:
            raise UserError(f"{e} (the settings of --config {args.config} and the flags)") from None
        raise
    return cfg, task


def on_cuda(device: Optional[str]) -> bool:
    """Whether a run with --device `device` trains on a GPU (no --device: CUDA when there is one)."""
    import torch

    if device in (None, "", "auto"):
        return torch.cuda.is_available()
    return str(device).startswith("cuda")


def run(args: argparse.Namespace) -> int:
    from . import UserError

    if not getattr(args, "train_command", None):
        raise UserError("name a task: `samvit train mae ...`, `samvit train sam ...`, `samvit train distill ...` "
                        "or `samvit train export-encoder ...` (see --help)")
    if args.train_command == "export-encoder":
        _run_export(args)
        return 0
    cfg, task = run_settings(args)
    check_run_dir_not_in_inputs(args)
    folder = args.train_command != "sam"  # sam also reads a COCO .json
    if args.data != "synthetic" and not (os.path.isdir if folder else os.path.exists)(args.data):
        raise UserError(f"--data {args.data}: no such " + ("directory (expected a folder of images or 'synthetic')"
                                                           if folder else "file or directory"))
    run_task = {"mae": _run_mae, "sam": _run_sam, "distill": _run_distill}[args.train_command]
    run_task(cfg, task)  # the task's own checks, then the run
    return 0


def _run_mae(cfg, task) -> None:
    from ..train.mae import pretrain_mae

    pretrain_mae(cfg, task)


def _run_sam(cfg, task) -> None:
    from ..train.finetune import finetune_sam
    from . import UserError

    if task.store is not None and os.path.abspath(task.store) == os.path.abspath(cfg.out):
        raise UserError("--store and --out must be different paths")
    finetune_sam(cfg, task)


def _run_distill(cfg, task) -> None:
    from ..train.distill import distill
    from . import UserError

    if isinstance(task.student, str) and task.student.endswith(".json") and not os.path.isfile(task.student):
        raise UserError(f"--student {task.student}: no such file")
    distill(cfg, task)


def check_run_dir_not_in_inputs(args: argparse.Namespace) -> None:
    """The run folder (--out) is never one of the inputs nor inside an input folder (--data, --images,
    --teacher-store, --store): a run's checkpoints and pictures would become training data."""
    from . import UserError

    out = os.path.realpath(args.out)
    for flag in ("data", "images", "teacher_store", "store", "checkpoint", "teacher", "val_data"):
        value = getattr(args, flag, None)
        if not value or value == "synthetic" or not os.path.exists(value):
            continue
        real = os.path.realpath(value)
        if out == real or (os.path.isdir(real) and os.path.commonpath([out, real]) == real):
            raise UserError(f"--out {args.out}: is {'' if out == real else 'inside '}the input "
                            f"--{flag.replace('_', '-')} {value}; choose a run folder outside it")


def refuse_non_finite(state, source: str) -> None:
    """NonFiniteError naming `source` when a floating tensor of `state` holds NaN or infinite values."""
    import torch

    from ..errors import NonFiniteError

    bad = [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point()
           and not bool(torch.isfinite(v).all())]
    if bad:
        raise NonFiniteError(f"{source}: the weights hold NaN or infinite values ({', '.join(bad[:3])}"
                             f"{', ...' if len(bad) > 3 else ''}); a run that diverged? Export an earlier "
                             "checkpoint (RUN_DIR/ckpt_<step>.pt)")


def _run_export(args: argparse.Namespace) -> None:
    from ..train.ckpt import latest_checkpoint, list_checkpoints, load_checkpoint
    from ..train.transfer import mae_to_sam_encoder
    from ..checkpoints.load import save_encoder
    from . import UserError

    src, out = args.src, args.out
    if not os.path.exists(src):
        raise UserError(f"{src}: no such run directory or checkpoint file")
    if os.path.abspath(out) == os.path.abspath(src) or (os.path.isdir(src) and
                                                        os.path.commonpath([os.path.abspath(out),
                                                                            os.path.abspath(src)]) ==
                                                        os.path.abspath(src)):
        raise UserError(f"--out {out}: would write into the input {src}; choose a path outside it")
    if not out.endswith(".safetensors"):
        raise UserError(f"--out {out}: expected a .safetensors path")
    if os.path.isdir(out):
        raise UserError(f"--out {out}: is a folder; expected a .safetensors file name")
    if os.path.lexists(out) and not args.force:
        raise UserError(f"--out {out}: exists; pass --force to replace it")
    if os.path.isdir(src) and list_checkpoints(src):
        mae = latest_checkpoint(src)["model"]  # a run directory: its newest checkpoint
    elif os.path.isdir(src) and os.path.exists(os.path.join(src, "config.json")) and not any(
            os.path.exists(os.path.join(src, f)) for f in ("model.safetensors", "pytorch_model.bin")):
        raise UserError(f"{src}: a run directory without a checkpoint (ckpt_*.pt) yet")
    elif os.path.isfile(src) and os.path.basename(src).startswith("ckpt_") and src.endswith(".pt"):
        mae = load_checkpoint(src)["model"]
    else:
        mae = src  # an official or transformers MAE file, or a save_pretrained folder: transfer reads it
    if isinstance(mae, dict):
        refuse_non_finite(mae, src)
    encoder = mae_to_sam_encoder(mae, encoder_spec(args.preset, "--preset"))
    refuse_non_finite(encoder.state_dict(), src)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    save_encoder(encoder, out)
    if not getattr(args, "quiet", False):
        print(f"samvit train export-encoder: {encoder.config.name} encoder from {src} -> {out}")
