"""The training loop shared by MAE pre-training and SAM fine-tuning: one function, read top to bottom.

train(cfg, build_model, dataset, loss_fn) runs as a plain process or under torchrun (DDP, or FSDP2 with
cfg.fsdp), with activation checkpointing, bf16/fp16 autocast, gradient accumulation and clipping, AdamW on the
warmup + cosine schedule, checkpoints that resume bit for bit, and logs. The task supplies the model, the data
and loss_fn(model, batch) -> loss tensor (or a dict with "loss" and other scalars to log), and optionally its
validation (samvit.train.validate: held-out metrics every cfg.val_every steps and at the end, the best kept).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.utils.data import Dataset

from ..checkpoints.files import atomic_write
from ..errors import TrainingDivergedError
from .ckpt import (LOCK_FILE, latest_checkpoint, list_checkpoints, lock_run_dir, rng_state, save_checkpoint,
                   set_rng_state, unlock_run_dir)
from .data import Batches, to_device
from .launch import (Processes, all_gather, autocast, barrier, check_fsdp, check_precision, gradient_sync,
                     mean_over_processes, seed_everything, setup, teardown, unwrap, wrap)
from .log import LOG_FILE, Logger, peak_memory_mib, truncate_log
from .optim import LRSchedule, build_optimizer, scaled_lr
from .validate import Validation, load_best, validate

# loss_fn(model, batch) -> loss, or a dict with "loss" and other scalars to log. A loss_fn with the attribute
# `backward_inside = True` is called as loss_fn(model, batch, grad_scale=s) and may run backward on parts of its
# loss itself, as (part * s).backward(), s being the factor the loop applies to the returned loss (the fp16 grad
# scale / accum): it returns the full loss's value, whose own backward adds the gradient of the rest (SAM's
# interactive rounds: one round's graph at a time, samvit.train.finetune).
LossFn = Callable[..., Union[torch.Tensor, Dict[str, torch.Tensor]]]
Hook = Callable[[int, nn.Module], None]  # hook(step, model) after every optimizer step, on every process
CONFIG_FILE = "config.json"
log = logging.getLogger("samvit.train")


@dataclass
class TrainConfig:
    """Everything the loop needs besides the model, the data and the loss. `task` holds the task's own settings
    (model preset, data, ...: samvit.train.settings); with the optimisation fields it is the run's identity, checked
    on --resume."""

    out: str
    batch_size: int  # per process; the global batch is batch_size x accum x processes
    steps: Optional[int] = None  # train up to this optimizer step (or give epochs)
    epochs: Optional[int] = None
    accum: int = 1
    lr: Optional[float] = None  # absolute peak lr; default max(blr x global batch / 256, lr_floor)
    blr: float = 1.5e-4
    lr_floor: Optional[float] = None  # the least default peak lr: small batches still learn (the task's default)
    min_lr: float = 0.0
    warmup_steps: Optional[int] = None  # default: 10% of the cosine's length, 0 without a cosine
    decay_steps: Optional[int] = None  # the cosine reaches min_lr here; default: the --epochs length, else no decay
    weight_decay: float = 0.05
    betas: Tuple[float, float] = (0.9, 0.95)
    clip_grad: Optional[float] = None
    precision: str = "fp32"
    checkpointing: bool = False
    fsdp: bool = False
    seed: int = 0
    resume: bool = False
    log_every: int = 10
    ckpt_every: int = 500
    keep_last: int = 3
    num_workers: int = 0
    device: Optional[str] = None
    quiet: bool = False
    task: Dict = field(default_factory=dict)
    task_extra: Dict = field(default_factory=dict)  # the task's settings outside its identity (vis_every, ...)
    inputs: Tuple[str, ...] = ()  # RUN_DIR entries the task wrote before the loop (distill's teacher store)
    # validation (not part of the identity: a resumed run may add or change it): the task's held-out data, every
    # val_every steps (default: at every checkpoint) and at the end, on the first val_limit items (default: all)
    val_data: Optional[str] = None
    val_every: Optional[int] = None
    val_limit: Optional[int] = None

    # the fields that must match when a run is resumed (the others only say how far and how it is watched)
    IDENTITY = ("batch_size", "accum", "lr", "blr", "lr_floor", "min_lr", "warmup_steps", "decay_steps",
                "weight_decay", "betas", "clip_grad", "precision", "seed", "task")

    def __post_init__(self) -> None:
        def positive(name: str, v, allow_none: bool = False, kind=int) -> None:
            if v is None and allow_none:
                return
            if not isinstance(v, kind) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive number, got {v!r}")

        if (self.steps is None) == (self.epochs is None):
            raise ValueError("give exactly one of --steps N and --epochs E")
        for name in ("batch_size", "accum", "log_every", "ckpt_every", "keep_last"):
            positive(name, getattr(self, name))
        positive("steps", self.steps, True)
        positive("epochs", self.epochs, True)
        positive("decay_steps", self.decay_steps, True)
        positive("val_every", self.val_every, True)
        positive("val_limit", self.val_limit, True)
        if self.val_data is None and (self.val_every is not None or self.val_limit is not None):
            raise ValueError("--val-every and --val-limit need --val-data DIR (the held-out data to validate on)")
        for name in ("lr", "clip_grad"):
            positive(name, getattr(self, name), True, (int, float))
        if self.lr_floor is not None and (not isinstance(self.lr_floor, (int, float)) or self.lr_floor < 0):
            raise ValueError(f"--lr-floor must be 0 or more, got {self.lr_floor!r}")
        positive("blr", self.blr, kind=(int, float))
        if self.min_lr < 0 or self.weight_decay < 0 or self.num_workers < 0:
            raise ValueError("--min-lr, --weight-decay and --num-workers must not be negative")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError(f"--warmup-steps must not be negative, got {self.warmup_steps}")
        if self.decay_steps is not None and self.warmup_steps is not None and self.decay_steps <= self.warmup_steps:
            raise ValueError(f"--decay-steps ({self.decay_steps}) must be larger than --warmup-steps "
                             f"({self.warmup_steps})")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"AdamW betas must be in [0, 1), got {self.betas}")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"--precision must be fp32, bf16 or fp16, got {self.precision!r}")

    def identity(self) -> Dict:
        """The identity fields, as they read back from JSON."""
        return json.loads(json.dumps({k: getattr(self, k) for k in self.IDENTITY}))


def peak_lr(cfg: TrainConfig, global_batch: int) -> Tuple[float, str]:
    """(peak lr, where it comes from): --lr, else blr x global batch / 256 (MAE's and SAM's scaling rule), raised
    to cfg.lr_floor when the batch is small enough to fall below it."""
    if cfg.lr is not None:
        return cfg.lr, "--lr"
    rule = scaled_lr(cfg.blr, global_batch)
    rule_txt = f"blr {cfg.blr:g} x batch {global_batch} / 256"
    if cfg.lr_floor and rule < cfg.lr_floor:
        return cfg.lr_floor, f"{rule_txt} = {rule:.3g}, raised to the task's floor {cfg.lr_floor:g}; --lr sets it"
    return rule, rule_txt


def prepare_run_dir(cfg: TrainConfig, procs: Processes) -> None:
    """Create RUN_DIR with its config.json, or check that an existing run is the same run (only with --resume)."""
    path = os.path.join(cfg.out, CONFIG_FILE)
    started = os.path.exists(os.path.join(cfg.out, LOG_FILE)) or bool(list_checkpoints(cfg.out))
    if os.path.exists(path) and started:
        with open(path, encoding="utf-8") as fh:
            saved = json.load(fh).get("identity", {})
        now = cfg.identity()
        diff = [f"{k}: {saved.get(k)!r} there, {now[k]!r} now" for k in now if saved.get(k) != now[k]
                and not (k == "lr_floor" and k not in saved and now["lr"] is not None)]  # before the floor existed
        if not cfg.resume:
            what = f" with a different config ({'; '.join(diff)})" if diff else ""
            raise ValueError(f"--out {cfg.out}: already holds a run{what}; pass --resume to continue it, or choose "
                             "another --out")
        if diff:
            raise ValueError(f"--resume: {cfg.out} was started with a different config: {'; '.join(diff)}")
        return
    if os.path.isdir(cfg.out) and set(os.listdir(cfg.out)) - {CONFIG_FILE, LOCK_FILE, *cfg.inputs}:  # no step: anew
        raise ValueError(f"--out {cfg.out}: exists, is not empty and holds no run ({CONFIG_FILE}); choose another "
                         "--out")
    if os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        raise ValueError(f"--out {cfg.out}: exists and is not a directory")
    barrier(procs)  # every process has looked before the main one writes
    if procs.main:
        from .._version import __version__

        os.makedirs(cfg.out, exist_ok=True)
        record = {"identity": cfg.identity(), "config": dataclasses.asdict(cfg), "processes": procs.world,
                  "samvit": __version__}
        with atomic_write(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
            json.dump(record, fh, indent=2)
    barrier(procs)


def train(cfg: TrainConfig, build_model: Callable[[], nn.Module], dataset: Dataset, loss_fn: LossFn,
          hooks: Sequence[Hook] = (), validation: Optional[Validation] = None) -> Dict:
    """Train until cfg.steps (or cfg.epochs); returns {'step', 'loss', 'run_dir', 'best'} (loss of the last logged
    step; best: the best validation so far, see samvit.train.validate, or None)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    if (cfg.val_data is None) != (validation is None):
        raise ValueError("--val-data: the task gives no validation" if validation is None else
                         "train(validation=...) needs cfg.val_data (what it validates on)")

    # -- processes and the run directory
    procs = setup(cfg.device)
    device = procs.device
    lock = None  # RUN_DIR/train.lock, held by the main process while it trains: a second one is refused
    try:
        batches = Batches(dataset, cfg.batch_size, procs.world, procs.rank, cfg.seed, cfg.num_workers,
                          pin_memory=device.type == "cuda").start()  # workers forked before the model exists
        check_fsdp(procs, cfg.fsdp)
        if procs.main and os.path.isfile(os.path.join(cfg.out, CONFIG_FILE)):  # a run: lock before looking at it
            lock = lock_run_dir(cfg.out)
        prepare_run_dir(cfg, procs)
        if procs.main and lock is None:
            lock = lock_run_dir(cfg.out)

        # -- the model: the same initial weights on every process (FSDP2 does not broadcast them)
        seed_everything(cfg.seed)
        model = build_model().to(device)
        check_precision(cfg.precision, getattr(model, "config", None), cfg.fsdp)
        if cfg.checkpointing:
            if not hasattr(model, "set_grad_checkpointing"):
                raise ValueError(f"--checkpointing: {type(model).__name__} has no set_grad_checkpointing()")
            model.set_grad_checkpointing(True)
        model = wrap(model, procs, cfg.fsdp)
        seed_everything(cfg.seed + procs.rank)  # each process its own stream for what the task draws itself

        # -- optimizer, lr schedule, grad scaler
        global_batch = cfg.batch_size * cfg.accum * procs.world
        total = cfg.steps if cfg.steps is not None else cfg.epochs * batches.per_epoch // cfg.accum
        if total < 1:
            raise ValueError(f"--epochs {cfg.epochs}: {batches.per_epoch} batches per epoch make no optimizer step "
                             f"with --accum {cfg.accum}")
        decay = cfg.decay_steps if cfg.decay_steps is not None else (total if cfg.epochs is not None else None)
        warmup = cfg.warmup_steps if cfg.warmup_steps is not None else (round(0.1 * decay) if decay else 0)
        peak, lr_source = peak_lr(cfg, global_batch)
        schedule = LRSchedule(peak, warmup, decay, cfg.min_lr)
        optimizer = build_optimizer(unwrap(model), schedule.peak, cfg.weight_decay, cfg.betas)  # names as unwrapped
        scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
        params = [p for p in model.parameters() if p.requires_grad]

        # -- resume: model, optimizer, schedule, scaler, data position, RNG states
        step = 0
        state = latest_checkpoint(cfg.out) if cfg.resume else None
        if state is not None:
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                           options=StateDictOptions(full_state_dict=True))
            schedule = LRSchedule.from_state_dict(state["schedule"])
            if state["scaler"]:
                scaler.load_state_dict(state["scaler"])
            step, batches.epoch, batches.pos = state["step"], state["epoch"], state["pos"]
            if state["processes"] == procs.world:
                set_rng_state(state["rng"][procs.rank])
            elif procs.main:
                log.warning("resumed with %d processes, the run had %d: the data order and random streams differ "
                            "from an uninterrupted run", procs.world, state["processes"])
            if procs.main:
                truncate_log(cfg.out, step)
            del state
        elif cfg.resume and procs.main and not cfg.quiet:
            print(f"samvit train: no checkpoint in {cfg.out} yet; starting from step 0")
        if step >= total and procs.main and not cfg.quiet:
            print(f"samvit train: {cfg.out} is at step {step} already (asked for {total}); nothing to do")

        # -- validation: the best so far of a resumed run (RUN_DIR/best.json) is kept until a better one
        val_every = cfg.val_every or cfg.ckpt_every
        best = load_best(cfg.out, validation) if validation is not None and cfg.resume and procs.main else None

        logger = Logger(cfg.out, total, step, enabled=procs.main, quiet=cfg.quiet)
        if procs.main and not cfg.quiet:
            mode = "FSDP2" if cfg.fsdp else ("DDP" if procs.distributed else "1 process")
            print(f"samvit train: steps {step} -> {total}, global batch {global_batch} ({cfg.batch_size} x "
                  f"{cfg.accum} accum x {procs.world} proc), peak lr {schedule.peak:.3g} ({lr_source}), "
                  f"{cfg.precision}, {mode}, {device}, run dir {cfg.out}")

        # -- the loop
        values: Dict[str, float] = {}
        saved_at = step
        while step < total:
            lr = schedule.apply(optimizer, step)
            sums: Dict[str, torch.Tensor] = {}
            for micro in range(cfg.accum):
                batch = to_device(next(batches), device)
                with gradient_sync(model, micro == cfg.accum - 1):
                    with autocast(device, cfg.precision):
                        if getattr(loss_fn, "backward_inside", False):  # see LossFn
                            out = loss_fn(model, batch, grad_scale=scaler.get_scale() / cfg.accum)
                        else:
                            out = loss_fn(model, batch)
                    out = out if isinstance(out, dict) else {"loss": out}
                    stop_if_not_finite(out["loss"], step + 1, cfg.out, procs)
                    scaler.scale(out["loss"] / cfg.accum).backward()
                for k, v in out.items():
                    sums[k] = sums.get(k, 0.0) + v.detach().float() / cfg.accum
            step += 1
            validating_now = validation is not None and (step % val_every == 0 or step == total)
            logging_now = step % cfg.log_every == 0 or step == total or validating_now
            grad_norm = None
            if cfg.clip_grad is not None or logging_now:
                scaler.unscale_(optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad or float("inf"))
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)

            if logging_now:
                means = {k: mean_over_processes(v, procs).item() for k, v in sums.items()}
                gn = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
                values = {**means, "lr": lr, "grad_norm": gn.item(), "epoch": batches.epoch,
                          "images_per_s": logger.throughput(step, global_batch),
                          "peak_mem_mib": peak_memory_mib(device)}
                if cfg.precision == "fp16":
                    values["grad_scale"] = scaler.get_scale()
            logger.step(step)
            for hook in hooks:
                hook(step, unwrap(model))
            if validating_now:
                measured, best = validate(validation, model, procs, step, best, cfg.out,
                                          rebuild=build_model if cfg.fsdp else None)
                values.update(measured)
                logger.exclude(measured.get("val_seconds", 0.0))  # from the next images_per_s
            if logging_now:
                logger.log(step, values)
            if step % cfg.ckpt_every == 0 or step == total:
                msd, osd = get_state_dict(model, optimizer,
                                          options=StateDictOptions(full_state_dict=True, cpu_offload=True))
                stop_if_weights_not_finite(msd if procs.main else {}, step, cfg.out, procs)
                rngs = all_gather(rng_state(), procs)
                if procs.main:
                    save_checkpoint({"model": msd, "optimizer": osd, "schedule": schedule.state_dict(),
                                     "scaler": scaler.state_dict(), "epoch": batches.epoch, "pos": batches.pos,
                                     "rng": rngs, "processes": procs.world, "identity": cfg.identity()},
                                    cfg.out, step, cfg.keep_last)
                barrier(procs)
                saved_at = step
        logger.close()
        if procs.main and not cfg.quiet and values:
            print(f"samvit train: step {step}, loss {values['loss']:.4f}; checkpoint {cfg.out} (step {saved_at})")
        if procs.main and not cfg.quiet and best is not None:
            print(f"samvit train: best {best['metric']} {best['value']:.4f} at step {best['step']}: "
                  + ", ".join(os.path.join(cfg.out, f) for f in best["files"]))
        return {"step": step, "loss": values.get("loss"), "run_dir": cfg.out, "best": best}
    finally:
        unlock_run_dir(lock)
        teardown(procs)


def _any_process(flag: bool, procs: Processes) -> bool:
    """Whether `flag` is true on any process (every process calls it)."""
    if not procs.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=procs.device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def _diverged(step: int, what: str, run_dir: str) -> TrainingDivergedError:
    kept = list_checkpoints(run_dir)
    where = (f"the checkpoints before it are kept (newest: {os.path.basename(kept[-1])})" if kept else
             "no checkpoint was written before it")
    return TrainingDivergedError(f"step {step}: {what}; the run stopped at this step, {where} in {run_dir}. "
                                 "Lower --lr / --blr, add --clip-grad, or train in --precision fp32, then --resume")


def stop_if_not_finite(loss: torch.Tensor, step: int, run_dir: str, procs: Processes) -> None:
    """Stop the run (TrainingDivergedError, exit 1) at `step` when the loss is NaN or infinite on any process:
    before backward, so the weights and the checkpoints stay finite."""
    bad = not bool(torch.isfinite(loss.detach()).all())
    if _any_process(bad, procs):
        value = loss.detach().float().flatten()[0].item() if bad else float("nan")
        raise _diverged(step, f"the loss is {value} (not finite)" if bad else "the loss is not finite on "
                        "another process", run_dir)


def stop_if_weights_not_finite(state: Dict[str, torch.Tensor], step: int, run_dir: str, procs: Processes) -> None:
    """Stop the run before a checkpoint is written from weights holding NaN or infinite values (the loss was
    finite, the update was not). `state`: the full model state dict on the main process ({} elsewhere)."""
    bad = [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point()
           and not bool(torch.isfinite(v).all())]
    if _any_process(bool(bad), procs):
        raise _diverged(step, f"the update made the weights non-finite ({', '.join(bad[:3]) or 'on the main process'}"
                        f"{', ...' if len(bad) > 3 else ''}); this step was not saved", run_dir)
