"""Layers shared by the encoder and the decoder (as in the official segment-anything modeling/common.py)."""
from __future__ import annotations

from typing import Type

import torch
from torch import nn


class MLPBlock(nn.Module):
    """Linear -> activation -> Linear (GELU in the encoder's blocks, ReLU in the decoder's)."""

    def __init__(self, dim: int, hidden: int, act: Type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.lin1 = nn.Linear(dim, hidden)
        self.lin2 = nn.Linear(hidden, dim)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.act(self.lin1(x)))


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel axis of a (B,C,H,W) tensor, as in the official neck."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight.to(x.dtype)[:, None, None] * x + self.bias.to(x.dtype)[:, None, None]
