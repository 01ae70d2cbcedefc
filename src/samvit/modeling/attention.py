"""Multi-head attention over a token grid with decomposed relative position bias (one forward), and the helpers that
turn packed projections into a kernel's inputs (see kernels.py: the contract, the registry, the kernels).

The kernel is a choice, not a code path: Attention.forward builds one AttnInputs record (q, k, v per head, the two
relative-position terms, the key grid, the scale) and hands it to the kernel chosen for the call
(kernels.choose_kernel: a named kernel, or "auto" from what the registered kernels declare).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import (DEFAULT_KERNEL, KERNEL_ALIASES, KERNELS, AttnInputs, Kernel, attention_probs,  # noqa: F401
                      choose_kernel, register_kernel, resolve_kernel_name)
from ..errors import ParameterError


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


def _axis_parts(n: int, ws: int) -> List[Tuple[int, int, int]]:
    """Split an axis of n tokens into (first window, last window + 1, tokens per window) runs: full, then partial."""
    parts = [(0, n // ws, ws)] if n >= ws else []
    if n % ws:
        parts.append((n // ws, n // ws + 1, n % ws))
    return parts


def _fill_grid(x: torch.Tensor, grid: torch.Tensor, window_size: int, fill: torch.Tensor) -> None:
    """Copy x (B,H,W,*F) into grid, a (B, nWh, ws, nWw, ws, *F) view of a windowed buffer, and set the padding
    bottom/right to `fill` (F): one pass over x."""
    B, H, W = x.shape[:3]
    feat = x.shape[3:]
    ws = window_size
    if H % ws:
        grid[:, -1, H % ws:] = fill
    if W % ws:
        grid[:, :, :, -1, W % ws:] = fill
    for i0, i1, hs in _axis_parts(H, ws):
        for j0, j1, wd in _axis_parts(W, ws):
            src = x[:, i0 * ws:i0 * ws + (i1 - i0) * hs, j0 * ws:j0 * ws + (j1 - j0) * wd]
            grid[:, i0:i1, :hs, j0:j1, :wd].copy_(src.view(B, i1 - i0, hs, j1 - j0, wd, *feat))


def to_windows(x: torch.Tensor, window_size: int, fill: torch.Tensor, out: Optional[torch.Tensor] = None
               ) -> torch.Tensor:
    """(B,H,W,D) -> (B, nWh, nWw, ws, ws, D) windows in one copy; the padding bottom/right is set to `fill` (D,).

    Same values as window_partition of x padded with `fill` rows (window_partition pads with zeros). `out`: where
    to write them (else a new tensor).
    """
    B, H, W, D = x.shape
    ws = window_size
    nwh, nww = -(-H // ws), -(-W // ws)
    out = x.new_empty(B, nwh, nww, ws, ws, D) if out is None else out
    _fill_grid(x, out.permute(0, 1, 3, 2, 4, 5), ws, fill)  # the padded grid (B, nWh, ws, nWw, ws, D)
    return out


def to_window_heads(qkv: torch.Tensor, window_size: int, heads: int, fill: torch.Tensor,
                    out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Packed projections (B,H,W,3*heads*d) -> q, k, v per window and head, (3, B*nW, heads, ws*ws, d), in one copy
    (to_windows then the head-major copy of attention_inputs, without the intermediate); padding set to `fill`."""
    B, H, W, C3 = qkv.shape
    ws, d = window_size, C3 // (3 * heads)
    nwh, nww = -(-H // ws), -(-W // ws)
    out = qkv.new_empty(3, B * nwh * nww, heads, ws * ws, d) if out is None else out
    grid = out.view(3, B, nwh, nww, heads, ws, ws, d).permute(1, 2, 5, 3, 6, 0, 4, 7)  # (B, nWh, ws, nWw, ws, 3, h, d)
    _fill_grid(qkv.view(B, H, W, 3, heads, d), grid, ws, fill.view(3, heads, d))
    return out


def from_windows(windows: torch.Tensor, hw: Tuple[int, int], out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B, nWh, nWw, ws, ws, D) windows -> (B,H,W,D) contiguous in one copy (into `out` if given), dropping the
    padding."""
    B, _, _, ws, _, D = windows.shape
    H, W = hw
    out = windows.new_empty(B, H, W, D) if out is None else out
    grid = windows.permute(0, 1, 3, 2, 4, 5)
    for i0, i1, hs in _axis_parts(H, ws):
        for j0, j1, wd in _axis_parts(W, ws):
            dst = out[:, i0 * ws:i0 * ws + (i1 - i0) * hs, j0 * ws:j0 * ws + (j1 - j0) * wd]
            dst.view(B, i1 - i0, hs, j1 - j0, wd, D).copy_(grid[:, i0:i1, :hs, j0:j1, :wd])
    return out


def resize_rel_pos(rel_pos: torch.Tensor, length: int) -> torch.Tensor:
    """A (L, C) relative position table linearly resized to (length, C), as the official get_rel_pos does."""
    if rel_pos.shape[0] == length:
        return rel_pos
    resized = F.interpolate(rel_pos.reshape(1, rel_pos.shape[0], -1).permute(0, 2, 1), size=length, mode="linear")
    return resized.reshape(-1, length).permute(1, 0)


def get_rel_pos(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """Relative position table (q_size, k_size, C), linearly resized when the table's length differs."""
    max_rel_dist = int(2 * max(q_size, k_size) - 1)
    rel_pos = resize_rel_pos(rel_pos, max_rel_dist)
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


def attention_inputs(qkv: torch.Tensor, key_hw: Tuple[int, int], heads: int, scale: float,
                     rel_pos: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                     buffer: Optional[torch.Tensor] = None, float32_bias: bool = True) -> AttnInputs:
    """The kernel's record from packed projections qkv (B, N, 3*heads*d) of N = Hk*Wk tokens: q, k, v copied to
    head-major (B*heads, N, d) (into `buffer` (3, B, heads, N, d) when given), and with rel_pos (the (2Hk-1, d) and
    (2Wk-1, d) tables) the two bias terms from the unscaled q, computed in float32 and used in q's dtype
    (float32_bias=False: computed in q's dtype, as the official code)."""
    B, N, C3 = qkv.shape
    d = C3 // (3 * heads)
    src = qkv.view(B, N, 3, heads, d).permute(2, 0, 3, 1, 4)
    packed = src.reshape(3, B, heads, N, d) if buffer is None else buffer.copy_(src)
    return head_major_inputs(packed, key_hw, scale, rel_pos, float32_bias)


def head_major_inputs(packed: torch.Tensor, key_hw: Tuple[int, int], scale: float,
                      rel_pos: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                      float32_bias: bool = True) -> AttnInputs:
    """The kernel's record from q, k, v already head-major, packed (3, B, heads, N, d) (see attention_inputs)."""
    _, B, heads, N, d = packed.shape
    q, k, v = packed.reshape(3, B * heads, N, d).unbind(0)  # a view where packed is one (a buffer)
    rel_h = rel_w = None
    if rel_pos is not None:
        rel_h, rel_w = rel_pos_terms(q.float() if float32_bias else q, rel_pos[0], rel_pos[1], key_hw)
        rel_h = rel_h.to(q.dtype).reshape(B * heads, N, key_hw[0])
        rel_w = rel_w.to(q.dtype).reshape(B * heads, N, key_hw[1])
    return AttnInputs(q, k, v, rel_h, rel_w, key_hw, scale, heads)


def is_tracing() -> bool:
    """Whether the forward is being traced (torch.jit, torch.compile, torch.export / ONNX)."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export()


class Attention(nn.Module):
    """Multi-head attention over a (B,H,W,C) grid, within window_size windows when > 0 (else global), with optional
    decomposed relative position bias; or over a (B,N,C) token sequence (global, no relative position: the MAE ViT).
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, use_rel_pos: bool = False,
                 input_size: Tuple[int, int] = (14, 14), kernel: str = DEFAULT_KERNEL, window_size: int = 0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.window_size = window_size
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos = use_rel_pos
        if use_rel_pos:
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[0] - 1, self.head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[1] - 1, self.head_dim))
        self.set_kernel(kernel)

    def set_kernel(self, name: str) -> "Attention":
        """Use the registered kernel `name`, or "auto" (chosen per call from the kernels' declarations)."""
        self.kernel = resolve_kernel_name(name)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attention over x (B,H,W,C) (windows of window_size when > 0) or (B,N,C); same shape out."""
        dtype = self.qkv.weight.dtype
        qkv = self.qkv(x.to(dtype))
        inp = self.inputs(qkv)
        kernel = choose_kernel(self.kernel, x.device, dtype, torch.is_grad_enabled(), is_tracing())
        return self.proj(self.tokens(kernel(inp), qkv.shape))

    def inputs(self, qkv: torch.Tensor, buffer: Optional[torch.Tensor] = None) -> AttnInputs:
        """The kernel's record from the packed projections of x: (B,H,W,3C) cut into windows (a window's padding
        is filled with the qkv bias: the projection of the zero-padded token), or (B,N,3C). buffer: where the
        head-major q, k, v go, (3, B', heads, N', d) (the inference path's; windows are cut in the same copy)."""
        rel_pos = (self.rel_pos_h, self.rel_pos_w) if self.use_rel_pos else None
        if qkv.ndim == 3:
            if self.use_rel_pos:
                raise ParameterError("attention: relative positions need a (B,H,W,C) grid, got a (B,N,C) sequence")
            return attention_inputs(qkv, (1, qkv.shape[1]), self.num_heads, self.scale, buffer=buffer)
        B, H, W, C3 = qkv.shape
        ws = self.window_size
        if ws > 0:
            fill = self.qkv.bias if self.qkv.bias is not None else qkv.new_zeros(C3)
            packed = to_window_heads(qkv, ws, self.num_heads, fill.to(qkv.dtype), buffer)
            return head_major_inputs(packed, (ws, ws), self.scale, rel_pos)
        return attention_inputs(qkv.view(B, H * W, C3), (H, W), self.num_heads, self.scale, rel_pos, buffer)

    def tokens(self, out: torch.Tensor, shape: torch.Size, into: Optional[torch.Tensor] = None) -> torch.Tensor:
        """A kernel's token-major output (B', N, C) back on x's layout (`shape`: that of x's projections), the
        windows put back in place (into `into` when given)."""
        C = out.shape[-1]
        if len(shape) == 3:
            return out
        B, H, W = shape[:3]
        ws = self.window_size
        if ws > 0:
            return from_windows(out.view(B, -(-H // ws), -(-W // ws), ws, ws, C), (H, W), into)
        return out.view(B, H, W, C)

    def attention_probs(self, x: torch.Tensor) -> torch.Tensor:
        """The attention probabilities for x (B,H,W,C) (or (B,N,C)) by the official arithmetic (one
        kernels.attention_probs): (B * windows, heads, N, N), zero-padded windows as the official code."""
        inp = self.inputs(self.qkv(x.to(self.qkv.weight.dtype)))
        n = inp.q.shape[1]
        return attention_probs(inp).view(-1, self.num_heads, n, n)
