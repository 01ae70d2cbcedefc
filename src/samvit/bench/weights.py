"""Random SAM weights for benchmarks and tests: every parameter random, nothing left at zero (norm scales near 1),
so that a comparison on them exercises every tensor."""
from __future__ import annotations

from typing import Dict

import torch

from ..config import EncoderConfig


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter and floating buffer of `module` random values in place; returns it.

    Norm scales 1 + 0.1 N(0,1); position tables 0.1 N(0,1); other matrices 0.02 N(0,1); other vectors 0.05 N(0,1).
    """
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        r = torch.randn(p.shape, generator=g)
        leaf = name.rsplit(".", 1)[-1]
        if p.ndim == 1 and leaf == "weight" and _is_norm(module, name):
            p.copy_(1.0 + 0.1 * r)
        elif "pos" in name:
            p.copy_(0.1 * r)
        else:
            p.copy_(0.02 * r if p.ndim > 1 else 0.05 * r)
    for name, b in module.named_buffers():
        if b.is_floating_point() and not name.endswith(("pixel_mean", "pixel_std")):
            b.copy_(torch.randn(b.shape, generator=g))
    return module


def _is_norm(module: torch.nn.Module, param_name: str) -> bool:
    owner = module.get_submodule(param_name.rsplit(".", 1)[0]) if "." in param_name else module
    return "Norm" in type(owner).__name__


def random_weights(cfg: EncoderConfig, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Random encoder weights (randomize_; randomize_tinyvit_ for a TinyViTConfig) in the official layout, for the
    encoder of `cfg`."""
    from ..config import TinyViTConfig
    from ..modeling.encoder import ImageEncoder

    if isinstance(cfg, TinyViTConfig):
        from ..modeling.tinyvit import TinyViT

        return randomize_tinyvit_(TinyViT(cfg), seed).state_dict()
    return randomize_(ImageEncoder(cfg, "reference"), seed).state_dict()


@torch.no_grad()
def randomize_tinyvit_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights for a TinyViT (samvit's or the official) at a scale where each layer passes its input on:
    conv and linear weights ~ N(0, 1/fan_in), BatchNorm statistics with a positive variance, attention biases
    0.3 N(0,1), norm scales 1 + 0.1 N(0,1). (randomize_ would give BatchNorm a negative variance.)"""
    import math

    from torch import nn

    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) / math.sqrt(m.weight[0].numel()))
            if m.bias is not None:
                m.bias.copy_(0.05 * torch.randn(m.bias.shape, generator=g))
        elif isinstance(m, nn.BatchNorm2d):
            m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=g))
            m.bias.copy_(0.05 * torch.randn(m.bias.shape, generator=g))
            m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
        elif isinstance(m, nn.LayerNorm) or type(m).__name__ == "LayerNorm2d":
            m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=g))
            m.bias.copy_(0.05 * torch.randn(m.bias.shape, generator=g))
    for name, p in module.named_parameters():
        if name.endswith("attention_biases"):
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return module
