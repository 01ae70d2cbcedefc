"""LoRA (Hu et al. 2021): a frozen Linear plus a trainable low-rank update, merged back into a plain Linear on export.

    y = base(x) + (alpha / r) * B(A(x)),   A: in -> r (Kaiming-uniform init), B: r -> out (zero init)

so that a model with fresh adapters computes exactly what it computed before.
"""
from __future__ import annotations

import math
from typing import Iterable, List, Tuple

import torch
from torch import nn

from ..errors import ParameterError

# target -> the Linears it names in a block, one tuple per encoder family (the ViT's MLP, then TinyViT's)
LORA_TARGETS = {"qkv": (("attn.qkv",),), "proj": (("attn.proj",),),
                "mlp": (("mlp.lin1", "mlp.lin2"), ("mlp.fc1", "mlp.fc2"))}


class LoRALinear(nn.Module):
    """A frozen nn.Linear (`base`) plus the rank-r update (alpha / r) * lora_b(lora_a(x))."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None) -> None:
        super().__init__()
        if rank < 1:
            raise ParameterError(f"LoRA rank must be at least 1, got {rank}")
        self.base = base
        base.requires_grad_(False)
        self.rank = rank
        self.alpha = float(alpha if alpha is not None else rank)
        self.scaling = self.alpha / rank
        w = base.weight
        self.lora_a = nn.Linear(base.in_features, rank, bias=False, device=w.device, dtype=w.dtype)
        self.lora_b = nn.Linear(rank, base.out_features, bias=False, device=w.device, dtype=w.dtype)
        nn.init.kaiming_uniform_(self.lora_a.weight, a=math.sqrt(5))  # as nn.Linear (and peft)
        nn.init.zeros_(self.lora_b.weight)

    # the attention code reads these of its qkv Linear (dtype, the padding fill of windows)
    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_b(self.lora_a(x.to(self.lora_a.weight.dtype))).to(x.dtype) * self.scaling

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain nn.Linear computing the same function: W + (alpha / r) * B @ A (in float32, cast back)."""
        w = self.base.weight
        out = nn.Linear(self.in_features, self.out_features, bias=self.base.bias is not None, device=w.device,
                        dtype=w.dtype)
        delta = self.lora_b.weight.float() @ self.lora_a.weight.float()
        out.weight.copy_((w.float() + self.scaling * delta).to(w.dtype))
        if self.base.bias is not None:
            out.bias.copy_(self.base.bias)
        return out


def _targets(targets: Iterable[str]) -> List[str]:
    targets = list(targets)
    for t in targets:
        if t not in LORA_TARGETS:
            raise ParameterError(f"unknown LoRA target {t!r}; expected some of {', '.join(LORA_TARGETS)}")
    return targets


def _paths(block: nn.Module, target: str) -> Tuple[str, ...]:
    """The Linears `target` names in this block (the first family whose layers it has)."""
    for paths in LORA_TARGETS[target]:
        try:
            for path in paths:
                block.get_submodule(path)
        except AttributeError:
            continue
        return paths
    raise ParameterError(f"LoRA target {target!r}: {type(block).__name__} has none of "
                         f"{', '.join(p for paths in LORA_TARGETS[target] for p in paths)}")


def add_lora(blocks: Iterable[nn.Module], rank: int, targets: Iterable[str] = ("qkv",), alpha: float | None = None
             ) -> int:
    """Replace the target Linears of every given encoder block (encoder.attention_blocks()) by LoRALinear(rank);
    returns how many were wrapped. Targets: qkv (attention input projection), proj (attention output), mlp (both
    MLP layers)."""
    n = 0
    targets = _targets(targets)
    for block in blocks:
        for path in (p for t in targets for p in _paths(block, t)):
            parent_path, _, leaf = path.rpartition(".")
            parent = block.get_submodule(parent_path)
            layer = getattr(parent, leaf)
            if isinstance(layer, LoRALinear):
                raise ParameterError(f"{path} already has a LoRA adapter")
            setattr(parent, leaf, LoRALinear(layer, rank, alpha))
            n += 1
    return n


def merge_lora(module: nn.Module) -> int:
    """Replace every LoRALinear inside `module` by its merged nn.Linear (the official key names come back);
    returns how many were merged."""
    found = [(name, m) for name, m in module.named_modules() if isinstance(m, LoRALinear)]
    for name, m in found:
        parent_path, _, leaf = name.rpartition(".")
        setattr(module.get_submodule(parent_path) if parent_path else module, leaf, m.merged())
    return len(found)
