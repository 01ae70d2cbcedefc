"""The in-place inference path: a runner that reads a Block's weights and computes the block's forward into the
residual stream in place, every large intermediate in reused workspace buffers (nothing big is allocated per call).

glibc's default allocator serves every block over 32 MiB with fresh zeroed pages and returns it on free: millions
of page faults per ViT-B forward (docs/speed.md). This runner is the only home of that path; the modules keep one
forward each (used for training, tracing and export), and ImageEncoder chooses the runner (ImageEncoder.runner).
It computes the modules' own arithmetic (same kernels, same dtypes), only without temporaries.
"""
from __future__ import annotations

import threading
from typing import Dict

import torch
from torch import nn

from .attention import Attention, choose_kernel
from .common import LayerNorm, MLPBlock
from .workspace import Workspace


def linear_into(x: torch.Tensor, linear: nn.Module, out: torch.Tensor) -> torch.Tensor:
    """out = linear(x) for 2-D x, written into `out`: no allocation for a plain nn.Linear; any other layer (an
    adapter wrapping one) is called and its result copied."""
    if type(linear) is not nn.Linear:
        return out.copy_(linear(x))
    if linear.bias is None:
        return torch.mm(x, linear.weight.t(), out=out)
    return torch.addmm(linear.bias, x, linear.weight.t(), out=out)


def add_linear_(residual: torch.Tensor, x: torch.Tensor, linear: nn.Module, workspace: Workspace,
                name: str) -> torch.Tensor:
    """residual += linear(x) in place (2-D); the product goes straight into the residual when dtypes agree."""
    if type(linear) is nn.Linear and residual.dtype == linear.weight.dtype:
        residual.addmm_(x, linear.weight.t())
        return residual if linear.bias is None else residual.add_(linear.bias)
    out = workspace.get(name, (x.shape[0], linear.weight.shape[0]), linear.weight.dtype, x.device)
    return residual.add_(linear_into(x, linear, out))


def _layer_norm(x: torch.Tensor, norm: LayerNorm, dtype: torch.dtype) -> torch.Tensor:
    """norm(x) cast to `dtype`, the dtype of the matmul that follows (what Attention and MLPBlock cast to)."""
    return norm(x).to(dtype)


class InferenceRunner:
    """Runs an ImageEncoder's blocks in place under no autograd; one workspace per thread."""

    def __init__(self) -> None:
        self.workspaces: Dict[int, Workspace] = {}

    @staticmethod
    def supports(encoder: nn.Module) -> bool:
        """Whether the path applies: no autograd, no tracing, every block of the standard shape (LayerNorm,
        Attention, MLPBlock with GELU, drop path off or in eval)."""
        from .attention import is_tracing

        if torch.is_grad_enabled() or is_tracing():
            return False
        for blk in encoder.blocks:
            if not (isinstance(blk.norm1, LayerNorm) and isinstance(blk.norm2, LayerNorm)
                    and type(blk.attn) is Attention and type(blk.mlp) is MLPBlock and type(blk.mlp.act) is nn.GELU
                    and (isinstance(blk.drop_path, nn.Identity) or not blk.training)):
                return False
        return True

    def workspace(self) -> Workspace:
        """This thread's buffers."""
        return self.workspaces.setdefault(threading.get_ident(), Workspace())

    def release(self) -> int:
        """Free every thread's buffers; returns the bytes freed."""
        freed = sum(ws.nbytes() for ws in self.workspaces.values())
        self.workspaces.clear()
        return freed

    def embed(self, encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return encoder.forward_embed(x)

    def head(self, encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return encoder.forward_head(x)

    def block(self, blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """x (B,H,W,C), the residual stream (this call's own tensor) += the block's two branches, in place."""
        ws = self.workspace().scope("inference")
        dtype = blk.attn.qkv.weight.dtype
        self._attention(blk.attn, _layer_norm(x, blk.norm1, dtype), x, ws)
        C = x.shape[-1]
        self._mlp(blk.mlp, _layer_norm(x, blk.norm2, dtype).view(-1, C), x.view(-1, C), ws)
        return x

    def _attention(self, attn: Attention, x: torch.Tensor, residual: torch.Tensor, ws: Workspace) -> None:
        """residual += attn(x) for x (B,H,W,C), every large intermediate in workspace buffers."""
        B, H, W, C = x.shape
        dev, dtype = x.device, attn.qkv.weight.dtype
        nh, hd = attn.num_heads, attn.head_dim
        qkv = linear_into(x.reshape(-1, C), attn.qkv, ws.get("qkv", (B * H * W, 3 * C), dtype, dev))
        qkv = qkv.view(B, H, W, 3 * C)
        w = attn.window_size
        nb, n = (B * -(-H // w) * -(-W // w), w * w) if w > 0 else (B, H * W)
        inp = attn.inputs(qkv, ws.get("qkv_heads", (3, nb, nh, n, hd), dtype, dev))  # windows cut in the same copy
        kernel = choose_kernel(attn.kernel, dev, dtype, grad=False, tracing=False)
        out = kernel(inp, ws.get("attn_out", (nb, n, C), dtype, dev), ws)
        if w > 0:
            out = attn.tokens(out, qkv.shape, ws.get("tokens", (B, H, W, C), dtype, dev))
        add_linear_(residual.view(-1, C), out.view(-1, C), attn.proj, ws, "proj")

    def _mlp(self, mlp: MLPBlock, x: torch.Tensor, residual: torch.Tensor, ws: Workspace) -> None:
        """residual += mlp(x) for 2-D x, the hidden layer in a workspace buffer."""
        h = linear_into(x, mlp.lin1, ws.get("mlp_hidden", (x.shape[0], mlp.lin1.weight.shape[0]),
                                            mlp.lin1.weight.dtype, x.device))
        torch.ops.aten.gelu_(h, approximate=mlp.act.approximate)
        add_linear_(residual, h, mlp.lin2, ws, "mlp_out")

