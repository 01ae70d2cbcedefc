"""AdamW with MAE's parameter groups, the lr scaling rule, and the warmup + half-cycle cosine schedule."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float, skip: Iterable[str] = ()) -> List[Dict]:
    """Two AdamW groups of the trainable parameters: with weight decay, and without it for norms and biases
    (ndim <= 1), the model's no_weight_decay() names (position embeddings, tokens) and `skip`."""
    no_decay = set(skip) | (set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set())
    decay, rest, decay_names, rest_names = [], [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name in no_decay:
            rest.append(p), rest_names.append(name)
        else:
            decay.append(p), decay_names.append(name)
    return [{"params": decay, "weight_decay": weight_decay, "param_names": decay_names},
            {"params": rest, "weight_decay": 0.0, "param_names": rest_names}]


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
