"""Layers shared by the encoder and the decoder (as in the official segment-anything modeling/common.py), and the
block's optional parts (timm's shape: Identity when off)."""
from __future__ import annotations

from typing import Type

import torch
import torch.nn.functional as F
from torch import nn
from ..errors import ParameterError


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm computed in the input's dtype, its parameters cast to it: a bfloat16/float16 model keeps its
    residual stream and LayerNorm parameters in float32 and normalises in float32 (the layer after it casts)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is None or self.weight.dtype == x.dtype:
            return super().forward(x)
        return F.layer_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


class MLPBlock(nn.Module):
    """Linear -> activation -> Linear (GELU in the encoder's blocks, ReLU in the decoder's); the input is cast to
    the weights' dtype."""

    def __init__(self, dim: int, hidden: int, act: Type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.lin1 = nn.Linear(dim, hidden)
        self.lin2 = nn.Linear(hidden, dim)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.lin1.weight  # a method, not a tensor, in torch.ao's dynamically quantised Linear (float input)
        return self.lin2(self.act(self.lin1(x if callable(w) else x.to(w.dtype))))


class DropPath(nn.Module):
    """Stochastic depth (as timm): in training, each sample's branch is zeroed with probability drop_prob and the
    others scaled by 1 / (1 - drop_prob); the identity in eval. Blocks hold nn.Identity when the rate is 0."""

    def __init__(self, drop_prob: float) -> None:
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            raise ParameterError(f"drop path rate must be in [0, 1), got {drop_prob}")
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_prob == 0.0:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


def drop_path(rate: float) -> nn.Module:
    """DropPath(rate), or nn.Identity for 0."""
    return DropPath(rate) if rate > 0 else nn.Identity()


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
