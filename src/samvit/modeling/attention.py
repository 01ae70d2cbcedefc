"""Multi-head attention with decomposed relative position bias, and the registry of attention kernels.

A kernel computes softmax(q.k * scale + rel_h + rel_w) v from the packed (B, N, 3, heads, head_dim) projections;
one set of weights serves every kernel. Registered here:
- "reference": the official segment-anything arithmetic step by step (full score matrix), the oracle in tests;
  an encoder using it runs the official arithmetic around it as well (blocks, neck, the weights' dtype).
- "sdpa_chunked": the same function with scaled_dot_product_attention, the bias built in chunks, never whole.
- "matmul_blocked": scores GEMM (baddbmm onto the bias chunk) + softmax in place + GEMM, in cache-sized blocks.
- "auto" (the default): matmul_blocked on the CPU inference path, sdpa_chunked everywhere else (see auto_attention).
A new kernel is one function registered with @register_kernel("name"); ImageEncoder(kernel="name") uses it.
A kernel that also takes the keywords `out` (B, N, heads*head_dim) and `workspace` (a Workspace, or None) writes
into `out` and takes its scratch memory from the workspace on the encoder's inference path.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .common import add_linear_, linear_into
from .workspace import Workspace
from ..errors import ParameterError

# The additive bias is built and used in chunks of at most this many entries (16 MiB in float32 on CPU, so that
# it stays in the last-level cache; 2 MiB more per thread beyond 4 threads, so that a chunk keeps every thread
# busy); on a GPU, few large launches. ViT-B's global attention: one head and 1024 queries per chunk.
MASK_CHUNK_ELEMS = 1 << 22
MASK_CHUNK_ELEMS_CUDA = 1 << 28
MIN_CHUNK_QUERIES = 768  # see _chunking

# A kernel: (attention module, qkv (B, N, 3, heads, head_dim), (H, W) of the N tokens) -> (B, N, heads*head_dim).
KernelFn = Callable[["Attention", torch.Tensor, Tuple[int, int]], torch.Tensor]


@dataclass(frozen=True)
class Kernel:
    """A registered attention kernel; `official`: the encoder runs the official arithmetic around it."""

    name: str
    fn: KernelFn
    official: bool = False
    takes_out: bool = False  # fn(attn, qkv, hw, out=..., workspace=...) writes into out

    def run(self, attn: "Attention", qkv: torch.Tensor, hw: Tuple[int, int], out: torch.Tensor,
            workspace: Optional[Workspace]) -> torch.Tensor:
        """The kernel's result written into `out` (B, N, heads*head_dim)."""
        if self.takes_out:
            return self.fn(attn, qkv, hw, out=out, workspace=workspace)
        return out.copy_(self.fn(attn, qkv, hw))


KERNELS: Dict[str, Kernel] = {}
KERNEL_ALIASES = {"fast": "auto"}  # the former attn_impl names
DEFAULT_KERNEL = "auto"


def register_kernel(name: str, official: bool = False) -> Callable[[KernelFn], KernelFn]:
    """Decorator: register an attention kernel under `name` (see KernelFn)."""
    def add(fn: KernelFn) -> KernelFn:
        params = inspect.signature(fn).parameters
        KERNELS[name] = Kernel(name, fn, official, takes_out="out" in params and "workspace" in params)
        return fn
    return add


def get_kernel(name: str) -> Kernel:
    """The kernel registered as `name` (or a former alias: "fast"); the one place a kernel name is resolved."""
    name = KERNEL_ALIASES.get(name, name)
    if name not in KERNELS:
        raise ParameterError(f"unknown attention kernel {name!r}; expected one of {', '.join(KERNELS)} "
                             f"(or {', '.join(KERNEL_ALIASES)})")
    return KERNELS[name]


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
    grid = out.permute(0, 1, 3, 2, 4, 5)  # (B, nWh, ws, nWw, ws, D): the padded grid, window-major in memory
    if H % ws:
        grid[:, -1, H % ws:] = fill
    if W % ws:
        grid[:, :, :, -1, W % ws:] = fill
    for i0, i1, hs in _axis_parts(H, ws):
        for j0, j1, wd in _axis_parts(W, ws):
            src = x[:, i0 * ws:i0 * ws + (i1 - i0) * hs, j0 * ws:j0 * ws + (j1 - j0) * wd]
            grid[:, i0:i1, :hs, j0:j1, :wd].copy_(src.view(B, i1 - i0, hs, j1 - j0, wd, D))
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


class Attention(nn.Module):
    """Multi-head attention over a (B,H,W,C) grid, with optional decomposed relative position bias."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, use_rel_pos: bool = False,
                 input_size: Tuple[int, int] = (14, 14), kernel: str = DEFAULT_KERNEL) -> None:
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
        self.set_kernel(kernel)

    def set_kernel(self, name: str) -> "Attention":
        """Use the registered kernel `name` (see KERNELS)."""
        self.kernel = get_kernel(name)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attention over all tokens of a (B,H,W,C) grid (a window, or the whole grid) with this module's kernel."""
        B, H, W, C = x.shape
        qkv = self.qkv(x).reshape(B, H * W, 3, self.num_heads, self.head_dim)
        return self.proj(self.kernel.fn(self, qkv, (H, W)).view(B, H, W, C))

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The official arithmetic whatever the kernel: full score matrix, bias added, softmax, weighted sum."""
        B, H, W, C = x.shape
        qkv = self.qkv(x).reshape(B, H * W, 3, self.num_heads, self.head_dim)
        return self.proj(reference_attention(self, qkv, (H, W)).view(B, H, W, C))

    def forward_windowed(self, x: torch.Tensor, window_size: int) -> torch.Tensor:
        """Windowed attention on an unpartitioned (B,H,W,C) grid; equals partition -> attention -> unpartition.

        qkv and proj run on the real tokens only: a zero-padded token's qkv is exactly the qkv bias, so the
        padding is filled with it; the padded tokens' outputs are dropped, so proj never sees them.
        """
        B, H, W, C = x.shape
        ws = window_size
        qkv = self.qkv(x)
        fill = self.qkv.bias if self.qkv.bias is not None else qkv.new_zeros(3 * C)
        windows = to_windows(qkv, ws, fill)  # (B, nWh, nWw, ws, ws, 3C)
        nw = windows.shape[1] * windows.shape[2]
        out = self.kernel.fn(self, windows.view(B * nw, ws * ws, 3, self.num_heads, self.head_dim), (ws, ws))
        out = from_windows(out.view(B, windows.shape[1], windows.shape[2], ws, ws, C), (H, W))
        return self.proj(out)

    def forward_seq(self, x: torch.Tensor) -> torch.Tensor:
        """Global attention over a token sequence (B,N,C), no relative position (the MAE ViT, class token included)."""
        if self.use_rel_pos:
            raise ParameterError("forward_seq: relative positions need a (B,H,W,C) grid; use forward")
        B, N, C = x.shape
        return self.proj(self.kernel.fn(self, self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim), (N, 1)))

    def forward_into(self, x: torch.Tensor, residual: torch.Tensor, window_size: int,
                     workspace: Workspace) -> torch.Tensor:
        """residual (B,H,W,C) += attention over x (B,H,W,C) (windowed when window_size > 0, as forward_windowed),
        in place; every large intermediate in workspace buffers (the inference path)."""
        B, H, W, C = x.shape
        dev, dtype = x.device, self.qkv.weight.dtype
        nh, hd = self.num_heads, self.head_dim
        qkv = linear_into(x.reshape(-1, C), self.qkv, workspace.get("qkv", (B * H * W, 3 * C), dtype, dev))
        if window_size > 0:
            ws = window_size
            nwh, nww = -(-H // ws), -(-W // ws)
            fill = self.qkv.bias if self.qkv.bias is not None else qkv.new_zeros(3 * C)
            windows = to_windows(qkv.view(B, H, W, 3 * C), ws, fill,
                                 workspace.get("windows", (B, nwh, nww, ws, ws, 3 * C), dtype, dev))
            out = workspace.get("attn_out", (B * nwh * nww, ws * ws, C), dtype, dev)
            self.kernel.run(self, windows.view(-1, ws * ws, 3, nh, hd), (ws, ws), out, workspace)
            tokens = from_windows(out.view(B, nwh, nww, ws, ws, C), (H, W),
                                  workspace.get("tokens", (B, H, W, C), dtype, dev))
        else:
            tokens = workspace.get("attn_out", (B, H * W, C), dtype, dev)
            self.kernel.run(self, qkv.view(B, H * W, 3, nh, hd), (H, W), tokens, workspace)
        add_linear_(residual.view(-1, C), tokens.view(-1, C), self.proj, workspace, "proj")
        return residual

    def attention_probs(self, x: torch.Tensor) -> torch.Tensor:
        """The attention probabilities over a (B,H,W,C) grid by the reference arithmetic: (B, heads, N, N)."""
        B, H, W, _ = x.shape
        qkv = self.qkv(x).reshape(B, H * W, 3, self.num_heads, self.head_dim)
        q, k, _ = qkv.permute(2, 0, 3, 1, 4).reshape(3, B * self.num_heads, H * W, -1).unbind(0)
        return _reference_probs(self, q, k, (H, W)).view(B, self.num_heads, H * W, H * W)


def _reference_probs(attn: Attention, q: torch.Tensor, k: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
    """softmax(q.k * scale + rel_h + rel_w) of (B*heads, N, hd) q and k, as the official code computes it."""
    H, W = hw
    scores = (q * attn.scale) @ k.transpose(-2, -1)
    if attn.use_rel_pos:
        rel_h, rel_w = rel_pos_terms(q, attn.rel_pos_h, attn.rel_pos_w, (H, W))
        scores = (scores.view(-1, H, W, H, W) + rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :])
        scores = scores.view(-1, H * W, H * W)
    return scores.softmax(dim=-1)


@register_kernel("reference", official=True)
def reference_attention(attn: Attention, qkv: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
    """The official arithmetic: full score matrix, bias added, softmax, weighted sum (the oracle)."""
    B, N = qkv.shape[:2]
    q, k, v = qkv.permute(2, 0, 3, 1, 4).reshape(3, B * attn.num_heads, N, -1).unbind(0)  # (B*nh, N, hd) each
    out = _reference_probs(attn, q, k, hw) @ v
    return out.view(B, attn.num_heads, N, -1).permute(0, 2, 1, 3).reshape(B, N, -1)


@register_kernel("sdpa_chunked")
def sdpa_chunked_attention(attn: Attention, qkv: torch.Tensor, hw: Tuple[int, int],
                           out: Optional[torch.Tensor] = None, workspace: Optional[Workspace] = None) -> torch.Tensor:
    """softmax(q.k*scale + rel_h + rel_w) v with SDPA, chunked over batch, heads and query rows so that the
    additive bias is never built whole (see _chunking); with a workspace every chunk's bias reuses one buffer."""
    B, N = qkv.shape[:2]
    nh, hd = attn.num_heads, attn.head_dim
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, nh, N, hd) strided views, no copies
    out = qkv.new_empty(B, N, nh * hd) if out is None else out
    out4 = out.view(B, N, nh, hd)
    if not attn.use_rel_pos:
        out4.copy_(F.scaled_dot_product_attention(q, k, v).transpose(1, 2))
        return out
    H, W = hw
    # The two bias terms are computed in float32 from q (cheap: H+W entries per query), then used in q's dtype
    # (a bfloat16 mask halves the bias traffic; its effect on accuracy is measured in docs/speed.md).
    rel_h, rel_w = _bias_terms(attn, q, hw)
    for b0, b1, h0, h1, r0, r1 in _chunks(B, nh, H, W, N, q.device):
        if workspace is None:
            bias = rel_h[b0:b1, h0:h1, r0:r1] + rel_w[b0:b1, h0:h1, r0:r1]  # (b, h, rows, W, H, W)
        else:
            bias = workspace.get("bias", (b1 - b0, h1 - h0, r1 - r0, W, H, W), q.dtype, q.device)
            torch.add(rel_h[b0:b1, h0:h1, r0:r1], rel_w[b0:b1, h0:h1, r0:r1], out=bias)
        o = F.scaled_dot_product_attention(q[b0:b1, h0:h1, r0 * W:r1 * W], k[b0:b1, h0:h1],
                                           v[b0:b1, h0:h1], attn_mask=bias.flatten(4).flatten(2, 3))
        out4[b0:b1, r0 * W:r1 * W, h0:h1].copy_(o.transpose(1, 2))
    return out


@register_kernel("matmul_blocked")
def matmul_blocked_attention(attn: Attention, qkv: torch.Tensor, hw: Tuple[int, int],
                             out: Optional[torch.Tensor] = None, workspace: Optional[Workspace] = None
                             ) -> torch.Tensor:
    """The official arithmetic in cache-sized blocks: per chunk, the bias written into the score buffer, the
    scores GEMM added onto it (baddbmm, scale as its alpha), softmax in place, the GEMM with v into the output.
    Scores are in q's dtype (bfloat16 for a bfloat16 model, as the official code under autocast)."""
    B, N = qkv.shape[:2]
    nh, hd = attn.num_heads, attn.head_dim
    H, W = hw
    dt, dev = qkv.dtype, qkv.device
    inplace = workspace is not None
    # one copy to head-major (3, B, nh, N, hd): every chunk is then a plain batch of matrices
    heads = workspace.get("qkv_heads", (3, B, nh, N, hd), dt, dev) if inplace else None
    if inplace:
        heads.copy_(qkv.permute(2, 0, 3, 1, 4))
    else:
        heads = qkv.permute(2, 0, 3, 1, 4).contiguous()
    q, k, v = heads.unbind(0)
    out = qkv.new_empty(B, N, nh * hd) if out is None else out
    out4 = out.view(B, N, nh, hd)
    rel_h, rel_w = _bias_terms(attn, q, hw) if attn.use_rel_pos else (None, None)
    for b0, b1, h0, h1, r0, r1 in _chunks(B, nh, H, W, N, dev):
        nb, nhc, rows = b1 - b0, h1 - h0, r1 - r0
        qc = q[b0:b1, h0:h1, r0 * W:r1 * W].flatten(0, 1)
        kt = k[b0:b1, h0:h1].flatten(0, 1).transpose(1, 2)
        vc = v[b0:b1, h0:h1].flatten(0, 1)
        if inplace:
            scores = workspace.get("scores", (nb * nhc, rows * W, N), dt, dev)
            if rel_h is None:
                torch.baddbmm(scores, qc, kt, beta=0, alpha=attn.scale, out=scores)
            else:
                torch.add(rel_h[b0:b1, h0:h1, r0:r1], rel_w[b0:b1, h0:h1, r0:r1],
                          out=scores.view(nb, nhc, rows, W, H, W))
                scores.baddbmm_(qc, kt, alpha=attn.scale)
            torch.ops.aten._softmax.out(scores, -1, False, out=scores)
            o = torch.bmm(scores, vc, out=workspace.get("attn_chunk", (nb * nhc, rows * W, hd), dt, dev))
        else:
            if rel_h is None:
                scores = torch.bmm(qc, kt) * attn.scale
            else:
                bias = (rel_h[b0:b1, h0:h1, r0:r1] + rel_w[b0:b1, h0:h1, r0:r1]).reshape(nb * nhc, rows * W, N)
                scores = torch.baddbmm(bias, qc, kt, alpha=attn.scale)
            o = torch.bmm(scores.softmax(-1), vc)
        out4[b0:b1, r0 * W:r1 * W, h0:h1].copy_(o.view(nb, nhc, rows * W, hd).transpose(1, 2))
    return out


@register_kernel("auto")
def auto_attention(attn: Attention, qkv: torch.Tensor, hw: Tuple[int, int], out: Optional[torch.Tensor] = None,
                   workspace: Optional[Workspace] = None) -> torch.Tensor:
    """matmul_blocked on the CPU inference path (a workspace is given: no autograd, no tracing), sdpa_chunked
    elsewhere: training keeps SDPA's backward, GPUs its fused kernels, exports one graph. Measured in
    docs/speed.md: on CPU the blocked kernel is faster in bfloat16 and no slower in float32."""
    blocked = workspace is not None and qkv.device.type == "cpu"
    kernel = matmul_blocked_attention if blocked else sdpa_chunked_attention
    return kernel(attn, qkv, hw, out=out, workspace=workspace)


def _bias_terms(attn: Attention, q: torch.Tensor, hw: Tuple[int, int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """rel_h (B,nh,H,W,H,1) and rel_w (B,nh,H,W,1,W) in q's dtype, computed in float32 from q (B,nh,N,hd)."""
    rel_h, rel_w = rel_pos_terms(q.float(), attn.rel_pos_h, attn.rel_pos_w, hw)
    return rel_h.to(q.dtype)[..., None], rel_w.to(q.dtype)[..., None, :]


def _chunks(B: int, nh: int, H: int, W: int, N: int, device: torch.device):
    """(b0, b1, h0, h1, r0, r1) chunks of batch items, heads and query rows (see _chunking)."""
    on_cpu = device.type == "cpu"
    budget = MASK_CHUNK_ELEMS + (max(0, torch.get_num_threads() - 4) << 21) if on_cpu else MASK_CHUNK_ELEMS_CUDA
    nb, nhc, n_row_chunks = _chunking(B, nh, H, W, N, budget, MIN_CHUNK_QUERIES)
    row_bounds = [H * i // n_row_chunks for i in range(n_row_chunks + 1)]
    for b0 in range(0, B, nb):
        for h0 in range(0, nh, nhc):
            for r0, r1 in zip(row_bounds[:-1], row_bounds[1:]):
                yield b0, min(B, b0 + nb), h0, min(nh, h0 + nhc), r0, r1


def _chunking(batch: int, heads: int, rows: int, row_len: int, n_keys: int, max_elems: int,
              min_queries: int = 768) -> Tuple[int, int, int]:
    """(batch items per chunk, heads per chunk, number of query-row chunks): about max_elems bias entries per
    chunk at most (rows are spread evenly over the chunks, up to 2x over), but at least min_queries queries per
    call where the grid has them: PyTorch's CPU flash kernel uses 256-query blocks from 768 queries on and
    32/64-query blocks below, which run slower."""
    per_row = row_len * n_keys  # bias entries of one head and one grid row of queries
    rmin = min(rows, -(-min_queries // row_len))
    if heads * rows * per_row <= max_elems:
        return max(1, max_elems // (heads * rows * per_row)), heads, 1
    if heads * rmin * per_row <= max_elems:
        return 1, heads, rows // (max_elems // (heads * per_row))
    nh = max(1, max_elems // (rmin * per_row))
    return 1, nh, rows // max(rmin, max_elems // (nh * per_row))
