"""AdamW with MAE's parameter groups, the lr scaling rule, and the warmup + half-cycle cosine schedule."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float, skip: Iterable[str] = ()) -> List[Dict]:
    """AdamW groups of the trainable parameters: with weight decay, and without it for norms and biases
    (ndim <= 1), the model's no_weight_decay() names (position embeddings, tokens) and `skip`. A model with
    lr_scales() (name -> lr multiplier: layer-wise lr decay) gets one such pair per multiplier, each group with
    its `lr_scale` (LRSchedule.apply multiplies the lr by it)."""
    no_decay = set(skip) | (set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set())
    scales = model.lr_scales() if hasattr(model, "lr_scales") else {}
    groups: Dict[Tuple[bool, float], Dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = not (p.ndim <= 1 or name in no_decay)
        scale = float(scales.get(name, 1.0))
        g = groups.setdefault((decay, scale), {"params": [], "weight_decay": weight_decay if decay else 0.0,
                                               "param_names": []})
        if scale != 1.0:
            g["lr_scale"] = scale
        g["params"].append(p), g["param_names"].append(name)
    if not scales:  # the two groups, decay first, even when one is empty
        return [groups.get((True, 1.0), {"params": [], "weight_decay": weight_decay, "param_names": []}),
                groups.get((False, 1.0), {"params": [], "weight_decay": 0.0, "param_names": []})]
    return [groups[k] for k in sorted(groups, key=lambda k: (-k[1], not k[0]))]


# Default peak lrs for small batches (peak lr = max(blr x global batch / 256, floor); `--lr` overrides both). The
# scaling rule's blr comes from the paper of each recipe; below a few hundred images per step it gives lrs under
# which a run barely moves (MAE's 1.5e-4 x 8 / 256 = 4.7e-6), so each task has a floor, from where it comes:
LR_FLOOR = {
    # MAE: its own rule gives 2.4e-3 at its batch 4096; docs/experiments.md's MAE runs learn at 1.5e-3, batch 32
    "mae": 1e-3,
    # SAM, frozen encoder (prompt encoder + mask decoder, or LoRA): MedSAM's AdamW lr 1e-4 (docs/finetune.md recipes)
    "sam": 1e-4,
    # SAM with the encoder's own weights training: micro-sam's lr 1e-5 (docs/finetune.md's full fine-tuning recipe)
    "sam_encoder": 1e-5,
    # distillation: docs/experiments.md's distillation runs learn at 2e-3 (batch 8); half of it as the floor
    "distill": 1e-3,
}


def build_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.05,
                    betas: Tuple[float, float] = (0.9, 0.95)) -> torch.optim.AdamW:
    """AdamW over param_groups(model)."""
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas)


def scaled_lr(base_lr: float, global_batch: int) -> float:
    """MAE's rule: lr = base_lr x global batch / 256 (global batch = per-process batch x accumulation x processes)."""
    return base_lr * global_batch / 256


@dataclass
class LRSchedule:
    """Linear warmup from 0 over `warmup` steps, then a half-cycle cosine from `peak` down to `min_lr` at step
    `decay` (None: constant `peak` after warmup), per optimizer step, as MAE's lr_sched.adjust_learning_rate."""

    peak: float
    warmup: int = 0
    decay: Optional[int] = None
    min_lr: float = 0.0

    def __call__(self, step: int) -> float:
        """The lr of optimizer step `step` (0-based)."""
        if step < self.warmup:
            return self.peak * step / self.warmup
        if self.decay is None:
            return self.peak
        if step >= self.decay:
            return self.min_lr
        t = (step - self.warmup) / (self.decay - self.warmup)
        return self.min_lr + (self.peak - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """Set every group's lr for `step` (times the group's `lr_scale` when it has one); returns the base lr."""
        lr = self(step)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        return lr

    def state_dict(self) -> Dict:
        return asdict(self)

    @classmethod
    def from_state_dict(cls, d: Dict) -> "LRSchedule":
        return cls(**d)
