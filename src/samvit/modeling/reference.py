"""The official segment-anything arithmetic, step by step, as a runner over an ImageEncoder's modules: the oracle
(ImageEncoder(kernel="reference")), bit for bit what the official ImageEncoderViT computes on the same weights.

It differs from the modules' own forward only in the order of operations: the residual stream stays in the
weights' dtype and in the patch embedding's channels-first memory, windows are zero-padded after norm1 and
projected whole, attention builds the full score matrix (kernels.reference_attention), the neck runs on (B,C,H,W).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import KERNELS, attention_inputs, window_partition, window_unpartition


class ReferenceRunner:
    """embed / block / head of the official code (autograd works through it)."""

    def embed(self, encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
        x = encoder.patch_embed(encoder.check_input(x))
        if encoder.pos_embed is not None:
            x = x + encoder.position_embedding(x.shape[1:3]).to(x.dtype)
        return x

    def block(self, blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = _layer_norm(x, blk.norm1)
        if blk.window_size > 0:
            H, W = x.shape[1], x.shape[2]
            x, pad_hw = window_partition(x, blk.window_size)
            x = window_unpartition(self.attention(blk.attn, x), blk.window_size, pad_hw, (H, W))
        else:
            x = self.attention(blk.attn, x)
        x = shortcut + blk.drop_path(x)
        return x + blk.drop_path(blk.mlp(_layer_norm(x, blk.norm2)))

    @staticmethod
    def attention(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The official Attention.forward on a (B,H,W,C) grid (a window or the whole grid)."""
        B, H, W, C = x.shape
        qkv = attn.qkv(x).reshape(B, H * W, 3 * C)
        rel_pos = (attn.rel_pos_h, attn.rel_pos_w) if attn.use_rel_pos else None
        inp = attention_inputs(qkv, (H, W), attn.num_heads, attn.scale, rel_pos, float32_bias=False)
        return attn.proj(KERNELS["reference"](inp).view(B, H, W, C))

    def head(self, encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if encoder.neck is not None:
            x = encoder.neck(x.permute(0, 3, 1, 2))
        return x


def _layer_norm(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    """nn.LayerNorm's own arithmetic (parameters as held: float32 LayerNorm parameters on a bfloat16 stream)."""
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
