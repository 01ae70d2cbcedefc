"""Layers shared by the encoder and the decoder (as in the official segment-anything modeling/common.py)."""
from __future__ import annotations

from typing import Type

import torch
from torch import nn

from .workspace import Workspace


def linear_into(x: torch.Tensor, linear: nn.Linear, out: torch.Tensor) -> torch.Tensor:
    """out = linear(x) for 2-D x, written into `out` (no allocation for a plain nn.Linear; any other layer, e.g. a
    LoRALinear, is called and its result copied)."""
    if type(linear) is not nn.Linear:
        return out.copy_(linear(x))
    if linear.bias is None:
        return torch.mm(x, linear.weight.t(), out=out)
    return torch.addmm(linear.bias, x, linear.weight.t(), out=out)


def add_linear_(residual: torch.Tensor, x: torch.Tensor, linear: nn.Linear, workspace: Workspace,
                name: str) -> torch.Tensor:
    """residual += linear(x) in place (2-D); the product goes straight into the residual when dtypes agree."""
    if residual.dtype == linear.weight.dtype and type(linear) is nn.Linear:
        residual.addmm_(x, linear.weight.t())
        return residual if linear.bias is None else residual.add_(linear.bias)
    out = workspace.get(name, (x.shape[0], linear.out_features), linear.weight.dtype, x.device)
    return residual.add_(linear_into(x, linear, out))


class MLPBlock(nn.Module):
    """Linear -> activation -> Linear (GELU in the encoder's blocks, ReLU in the decoder's)."""

    def __init__(self, dim: int, hidden: int, act: Type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.lin1 = nn.Linear(dim, hidden)
        self.lin2 = nn.Linear(hidden, dim)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.act(self.lin1(x)))

    def forward_into(self, x: torch.Tensor, residual: torch.Tensor, workspace: Workspace) -> torch.Tensor:
        """residual += self(x) in place, for 2-D x, the hidden layer in a workspace buffer (inference)."""
        h = linear_into(x, self.lin1, workspace.get("mlp_hidden", (x.shape[0], self.lin1.out_features),
                                                    self.lin1.weight.dtype, x.device))
        if type(self.act) is nn.GELU:
            torch.ops.aten.gelu_(h, approximate=self.act.approximate)
        else:
            h = self.act(h)
        return add_linear_(residual, h, self.lin2, workspace, "mlp_out")


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
