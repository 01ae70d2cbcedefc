"""The SAM ViT image encoder: patch embedding, absolute position embedding, pre-norm blocks, neck."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import EncoderConfig
from .attention import ATTENTION_IMPLS, Attention, window_partition, window_unpartition


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
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class MLPBlock(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.lin1 = nn.Linear(dim, hidden)
        self.lin2 = nn.Linear(hidden, dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.act(self.lin1(x)))


class PatchEmbed(nn.Module):
    """Image (B,3,H,W) -> patch tokens (B,H/16,W/16,C)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


class Block(nn.Module):
    """Pre-norm transformer block; windowed attention when window_size > 0, else global."""

    def __init__(self, cfg: EncoderConfig, window_size: int) -> None:
        super().__init__()
        dim = cfg.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=cfg.norm_eps)
        attn_size = (window_size, window_size) if window_size > 0 else (cfg.grid_size, cfg.grid_size)
        self.attn = Attention(dim, cfg.num_heads, cfg.qkv_bias, cfg.use_rel_pos, attn_size)
        self.norm2 = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.mlp = MLPBlock(dim, int(dim * cfg.mlp_ratio))
        self.window_size = window_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            H, W = x.shape[1], x.shape[2]
            x, pad_hw = window_partition(x, self.window_size)
            x = window_unpartition(self.attn(x), self.window_size, pad_hw, (H, W))
        else:
            x = self.attn(x)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


def build_neck(embed_dim: int, out_chans: int, eps: float) -> nn.Sequential:
    """1x1 conv, LayerNorm2d, 3x3 conv, LayerNorm2d (no conv bias): C -> out_chans."""
    return nn.Sequential(
        nn.Conv2d(embed_dim, out_chans, kernel_size=1, bias=False),
        LayerNorm2d(out_chans, eps),
        nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
        LayerNorm2d(out_chans, eps),
    )


def resize_pos_embed(pos_embed: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
    """(1,h,w,C) absolute position table bicubically resized to (1,H,W,C) for other input sizes."""
    if tuple(pos_embed.shape[1:3]) == tuple(hw):
        return pos_embed
    p = F.interpolate(pos_embed.permute(0, 3, 1, 2).float(), size=hw, mode="bicubic", align_corners=False)
    return p.permute(0, 2, 3, 1).to(pos_embed.dtype)


class ImageEncoder(nn.Module):
    """The SAM ViT image encoder; parameter names match the official `image_encoder.` keys."""

    def __init__(self, config: EncoderConfig, attn_impl: str = "fast") -> None:
        super().__init__()
        self.config = cfg = config
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, cfg.embed_dim)
        self.pos_embed: Optional[nn.Parameter] = None
        if cfg.use_abs_pos:
            self.pos_embed = nn.Parameter(torch.zeros(1, cfg.grid_size, cfg.grid_size, cfg.embed_dim))
        self.blocks = nn.ModuleList(Block(cfg, cfg.block_window_size(i)) for i in range(cfg.depth))
        self.neck = build_neck(cfg.embed_dim, cfg.out_chans, cfg.norm_eps) if cfg.out_chans else None
        self.set_attention(attn_impl)

    def set_attention(self, impl: str) -> "ImageEncoder":
        """Choose the attention path: 'fast' (SDPA) or 'reference' (the official arithmetic)."""
        if impl not in ATTENTION_IMPLS:
            raise ValueError(f"unknown attention implementation {impl!r}; expected one of {ATTENTION_IMPLS}")
        for blk in self.blocks:
            blk.attn.impl = impl
        self.attn_impl = impl
        return self

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised padded images (B,3,S,S) -> pre-neck features (B,S/16,S/16,C)."""
        x = self.patch_embed(x)
        if self.pos_embed is not None:
            x = x + resize_pos_embed(self.pos_embed, x.shape[1:3])
        for blk in self.blocks:
            x = blk(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised padded images (B,3,1024,1024) -> embedding (B,256,64,64), or features without a neck."""
        x = self.forward_features(x)
        if self.neck is None:
            return x
        return self.neck(x.permute(0, 3, 1, 2))

    def num_parameters(self, include_pos_embed: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if not include_pos_embed and self.pos_embed is not None:
            n -= self.pos_embed.numel()
        return n
