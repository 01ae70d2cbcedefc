"""Multi-head attention with decomposed relative position bias: a reference path and a fast path.

The reference path mirrors the arithmetic of the official segment-anything code step by step and is the
oracle in tests; the fast path computes the same function with scaled_dot_product_attention.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

ATTENTION_IMPLS = ("fast", "reference")


def window_partition(x: torch.Tensor, window_size: int) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """(B,H,W,C) -> (B*nW, ws, ws, C) windows, zero-padding bottom/right to a multiple of ws."""
    B, H, W, C = x.shape
    pad_h = (window_size - H % window_size) % window_size
    pad_w = (window_size - W % window_size) % window_size
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    Hp, Wp = H + pad_h, W + pad_w
    x = x.view(B, Hp // window_size, window_size, Wp // window_size, window_size, C)
    windows = x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size, window_size, C)
    return windows, (Hp, Wp)


def window_unpartition(windows: torch.Tensor, window_size: int, pad_hw: Tuple[int, int],
                       hw: Tuple[int, int]) -> torch.Tensor:
    """(B*nW, ws, ws, C) windows -> (B,H,W,C), dropping the padding."""
    Hp, Wp = pad_hw
    H, W = hw
    B = windows.shape[0] // (Hp * Wp // window_size // window_size)
    x = windows.view(B, Hp // window_size, Wp // window_size, window_size, window_size, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, -1)
    if Hp > H or Wp > W:
        x = x[:, :H, :W, :].contiguous()
    return x


def get_rel_pos(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """Relative position table (q_size, k_size, C), linearly resized when the table's length differs."""
    max_rel_dist = int(2 * max(q_size, k_size) - 1)
    if rel_pos.shape[0] != max_rel_dist:
        resized = F.interpolate(rel_pos.reshape(1, rel_pos.shape[0], -1).permute(0, 2, 1),
                                size=max_rel_dist, mode="linear")
        rel_pos = resized.reshape(-1, max_rel_dist).permute(1, 0)
    q_coords = torch.arange(q_size, device=rel_pos.device)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size, device=rel_pos.device)[None, :] * max(q_size / k_size, 1.0)
    relative_coords = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    return rel_pos[relative_coords.long()]


def rel_pos_terms(q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor,
                  hw: Tuple[int, int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """The two decomposed bias terms from the unscaled q (..., H*W, C): rel_h (..., H, W, H), rel_w (..., H, W, W)."""
    H, W = hw
    Rh = get_rel_pos(H, H, rel_pos_h).to(q.dtype)
    Rw = get_rel_pos(W, W, rel_pos_w).to(q.dtype)
    r_q = q.reshape(*q.shape[:-2], H, W, q.shape[-1])
    rel_h = torch.einsum("...hwc,hkc->...hwk", r_q, Rh)
    rel_w = torch.einsum("...hwc,wkc->...hwk", r_q, Rw)
    return rel_h, rel_w


class Attention(nn.Module):
    """Multi-head attention over a (B,H,W,C) grid, with optional decomposed relative position bias."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, use_rel_pos: bool = False,
                 input_size: Tuple[int, int] = (14, 14)) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos = use_rel_pos
        if use_rel_pos:
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[0] - 1, self.head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[1] - 1, self.head_dim))
        self.impl = "fast"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.impl == "reference":
            return self.forward_reference(x)
        return self.forward_fast(x)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The official arithmetic: full score matrix, bias added, softmax, weighted sum."""
        B, H, W, _ = x.shape
        qkv = self.qkv(x).reshape(B, H * W, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, B * self.num_heads, H * W, -1).unbind(0)  # (B*nh, N, hd) each
        attn = (q * self.scale) @ k.transpose(-2, -1)
        if self.use_rel_pos:
            rel_h, rel_w = rel_pos_terms(q, self.rel_pos_h, self.rel_pos_w, (H, W))
            attn = (attn.view(-1, H, W, H, W) + rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :])
            attn = attn.view(-1, H * W, H * W)
        attn = attn.softmax(dim=-1)
        x = (attn @ v).view(B, self.num_heads, H, W, -1).permute(0, 2, 3, 1, 4).reshape(B, H, W, -1)
        return self.proj(x)

    def forward_fast(self, x: torch.Tensor) -> torch.Tensor:
        """scaled_dot_product_attention with the relative-position bias as an additive mask."""
        B, H, W, C = x.shape
        N = H * W
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, nh, N, hd) each
        if not self.use_rel_pos:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            rel_h, rel_w = rel_pos_terms(q, self.rel_pos_h, self.rel_pos_w, (H, W))  # (B,nh,H,W,H), (B,nh,H,W,W)
            out = torch.empty_like(q)
            rows = _query_rows_per_chunk(B * self.num_heads, N, W)
            for r0 in range(0, H, rows):
                r1 = min(H, r0 + rows)
                bias = (rel_h[:, :, r0:r1, :, :, None] + rel_w[:, :, r0:r1, :, None, :]).reshape(B, self.num_heads, -1, N)
                out[:, :, r0 * W:r1 * W] = F.scaled_dot_product_attention(q[:, :, r0 * W:r1 * W], k, v, attn_mask=bias)
        out = out.transpose(1, 2).reshape(B, H, W, C)
        return self.proj(out)


def _query_rows_per_chunk(batch_heads: int, n_keys: int, row_len: int, max_elems: int = 1 << 24) -> int:
    """How many grid rows of queries to process at once so the bias chunk stays under max_elems."""
    return max(1, max_elems // max(1, batch_heads * n_keys * row_len))
