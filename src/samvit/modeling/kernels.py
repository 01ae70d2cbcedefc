"""The attention kernel contract, the registry, and the built-in kernels.

A kernel computes softmax(q.k * scale + bias) v for one AttnInputs record; the bias of query i and key (kh, kw) is
rel_h[.., i, kh] + rel_w[.., i, kw] (the decomposed relative position of the official code; no bias when they are
None). A kernel is registered with one decorated function, an adapter from the record:

    @register_kernel("mine", autograd=True, devices=("cpu", "cuda"))
    def mine(inp: AttnInputs) -> torch.Tensor:          # -> (B*heads, Nq, d)
        return my_attention(inp.q, inp.k, inp.v, inp.rel_h, inp.rel_w, inp.scale)

Each kernel declares what it supports; `choose_kernel` ("auto") picks, among the kernels that declare a priority,
the highest one that supports the call (device, dtype, autograd, tracing). A kernel declared with
`workspace=True` also takes `out` (B, Nq, heads*d), token-major (what the output projection reads), and
`workspace` (a Workspace scope, or None) and writes into out; others return (B*heads, Nq, d) and are copied.
Every registered kernel is tested against "reference" (tests/test_kernels.py, parametrized over KERNELS).

Registered here: "reference" (the official arithmetic: full score matrix; the oracle), "sdpa_chunked" (SDPA with
the bias built in cache-sized chunks), "matmul_blocked" (scores GEMM onto the bias chunk, softmax in place,
GEMM with v; the CPU inference kernel), "memeff" (attention_memeff: a custom autograd function that keeps only
q, k, v, the rel-pos terms and a log-sum-exp per query for backward; "auto" under autograd on the CPU) and "flex"
(flex_attention: FlexAttention with a rel-pos score_mod; the GPU kernel, chosen by name).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, Optional, Tuple

import torch
import torch.nn.functional as F

from .attention_memeff import memeff_attention
from .flex_attention import flex_rel_attention
from .workspace import Workspace
from ..errors import ParameterError

# The additive bias is built and used in chunks of at most this many entries (16 MiB in float32 on CPU, so that
# it stays in the last-level cache; 2 MiB more per thread beyond 4 threads, so that a chunk keeps every thread
# busy); on a GPU, few large launches. ViT-B's global attention: one head and 1024 queries per chunk.
MASK_CHUNK_ELEMS = 1 << 22
MASK_CHUNK_ELEMS_CUDA = 1 << 28
MIN_CHUNK_QUERIES = 768  # see _chunking

ALL_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@dataclass(frozen=True)
class AttnInputs:
    """One attention call: q (B*heads, Nq, d), k and v (B*heads, Nk, d), rel_h (B*heads, Nq, Hk) and rel_w
    (B*heads, Nq, Wk) or None, the key grid (Hk, Wk) with Nk = Hk*Wk, the score scale, and the number of heads
    (for a kernel that writes the token-major output (B, Nq, heads*d))."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    rel_h: Optional[torch.Tensor]
    rel_w: Optional[torch.Tensor]
    key_hw: Tuple[int, int]
    scale: float
    heads: int = 1

    def __post_init__(self) -> None:
        BH, Nq, d = self.q.shape
        Nk = self.key_hw[0] * self.key_hw[1]
        if self.k.shape != (BH, Nk, d) or self.v.shape[:2] != (BH, Nk):
            raise ParameterError(f"attention inputs: q {tuple(self.q.shape)}, k {tuple(self.k.shape)}, "
                             f"v {tuple(self.v.shape)} do not fit the key grid {self.key_hw}")
        if (self.rel_h is None) != (self.rel_w is None):
            raise ParameterError("attention inputs: rel_h and rel_w go together")
        if BH % self.heads:
            raise ParameterError(f"attention inputs: {BH} rows of q is not a multiple of {self.heads} heads")

    @property
    def batch(self) -> int:
        return self.q.shape[0] // self.heads

    def queries(self, i0: int, i1: int) -> "AttnInputs":
        """The same call for the queries i0:i1 only (the keys unchanged)."""
        rh = None if self.rel_h is None else self.rel_h[:, i0:i1]
        rw = None if self.rel_w is None else self.rel_w[:, i0:i1]
        return AttnInputs(self.q[:, i0:i1], self.k, self.v, rh, rw, self.key_hw, self.scale, self.heads)


KernelFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Kernel:
    """A registered kernel and what it supports."""

    name: str
    fn: KernelFn
    autograd: bool = False  # differentiable (training)
    workspace: bool = False  # takes out= (B, Nq, heads*d) and workspace= (scratch buffers, or None)
    traceable: bool = False  # can be traced (torch.compile, torch.export / ONNX)
    devices: Optional[Tuple[str, ...]] = None  # device types it runs on; None: any
    dtypes: Tuple[torch.dtype, ...] = ALL_DTYPES
    priority: Optional[int] = None  # auto picks the highest supporting kernel; None: never picked by auto

    def supports(self, device: torch.device, dtype: torch.dtype, grad: bool = False, tracing: bool = False) -> bool:
        """Whether the kernel runs a call on `device` in `dtype` (differentiably if `grad`, traced if `tracing`)."""
        return ((self.devices is None or device.type in self.devices) and dtype in self.dtypes
                and (self.autograd or not grad) and (self.traceable or not tracing))

    def __call__(self, inp: AttnInputs, out: Optional[torch.Tensor] = None,
                 workspace: Optional[Workspace] = None) -> torch.Tensor:
        """The kernel's result, token-major (B, Nq, heads*d), written into `out` when given."""
        if self.workspace:
            scope = workspace.scope(f"kernel.{self.name}") if workspace is not None else None
            return self.fn(inp, out=out, workspace=scope)
        res = self.fn(inp)
        B, Nq, d = inp.batch, inp.q.shape[1], res.shape[-1]
        tokens = res.view(B, inp.heads, Nq, d).transpose(1, 2)
        if out is None:
            return tokens.reshape(B, Nq, inp.heads * d)
        out.view(B, Nq, inp.heads, d).copy_(tokens)
        return out


KERNELS: Dict[str, Kernel] = {}
KERNEL_ALIASES = {"fast": "auto"}  # the former attn_impl names
DEFAULT_KERNEL = "auto"


def register_kernel(name: str, *, autograd: bool = False, traceable: bool = False,
                    devices: Optional[Tuple[str, ...]] = None, dtypes: Tuple[torch.dtype, ...] = ALL_DTYPES,
                    priority: Optional[int] = None) -> Callable[[KernelFn], KernelFn]:
    """Decorator: register fn(inp: AttnInputs) -> (B*heads, Nq, d) as the kernel `name`, with what it supports; a
    fn that also takes the keywords `out` and `workspace` writes the token-major (B, Nq, heads*d) result into out."""
    if name == "auto" or name in KERNEL_ALIASES:
        raise ParameterError(f"{name!r} is reserved (the automatic choice)")

    def add(fn: KernelFn) -> KernelFn:
        params = inspect.signature(fn).parameters
        KERNELS[name] = Kernel(name, fn, autograd, "out" in params and "workspace" in params, traceable,
                               None if devices is None else tuple(devices), tuple(dtypes), priority)
        return fn
    return add


def resolve_kernel_name(name: str) -> str:
    """A kernel name checked against the registry ("auto" and the alias "fast" included)."""
    name = KERNEL_ALIASES.get(name, name)
    if name != "auto" and name not in KERNELS:
        raise ParameterError(f"unknown attention kernel {name!r}; expected auto or one of {', '.join(KERNELS)} "
                         f"(or {', '.join(KERNEL_ALIASES)})")
    return name


def choose_kernel(name: str, device: torch.device, dtype: torch.dtype, grad: bool, tracing: bool) -> Kernel:
    """The kernel `name`, or for "auto" the highest-priority registered kernel supporting the call: the one place a
    kernel is chosen."""
    if name != "auto":
        return KERNELS[resolve_kernel_name(name)]
    best = None
    for k in KERNELS.values():
        if k.priority is not None and k.supports(device, dtype, grad, tracing):
            if best is None or k.priority > best.priority:
                best = k
    if best is None:
        raise RuntimeError(f"no registered attention kernel supports {device.type} {dtype} "
                           f"(grad={grad}, tracing={tracing})")
    return best


def softmax_(x: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis in place. The one use of a private aten op (`_softmax.out`, no temporary); the
    public `torch.softmax(out=)` where it is missing."""
    try:
        return torch.ops.aten._softmax.out(x, -1, False, out=x)
    except (AttributeError, RuntimeError):  # pragma: no cover - a torch without the private op
        return torch.softmax(x, -1, out=x)


def attention_logits(inp: AttnInputs) -> torch.Tensor:
    """The full score matrix (B*heads, Nq, Nk): (q * scale) @ k^T, then + rel_h + rel_w, as the official code."""
    scores = (inp.q * inp.scale) @ inp.k.transpose(-2, -1)
    if inp.rel_h is None:
        return scores
    BH, Nq = scores.shape[:2]
    Hk, Wk = inp.key_hw
    scores = scores.view(BH, Nq, Hk, Wk) + inp.rel_h[:, :, :, None] + inp.rel_w[:, :, None, :]
    return scores.view(BH, Nq, Hk * Wk)


def attention_probs(inp: AttnInputs) -> torch.Tensor:
    """The attention probabilities (B*heads, Nq, Nk) by the official arithmetic: the one definition (used by the
    reference kernel, Attention.attention_probs and samvit.inspect)."""
    return attention_logits(inp).softmax(dim=-1)


@register_kernel("reference", autograd=True, traceable=True)
def reference_attention(inp: AttnInputs) -> torch.Tensor:
    """The official arithmetic: full score matrix, bias added, softmax, weighted sum (the oracle)."""
    return attention_probs(inp) @ inp.v


def _bias_views(inp: AttnInputs) -> Tuple[torch.Tensor, torch.Tensor]:
    """rel_h (B, heads, Nq, Hk, 1) and rel_w (B, heads, Nq, 1, Wk): their sum is the bias (.., Nq, Hk, Wk)."""
    B, nh = inp.batch, inp.heads
    Nq = inp.q.shape[1]
    return inp.rel_h.view(B, nh, Nq, -1, 1), inp.rel_w.view(B, nh, Nq, 1, -1)


@register_kernel("sdpa_chunked", autograd=True, traceable=True, priority=10)
def sdpa_chunked_attention(inp: AttnInputs, out: Optional[torch.Tensor] = None,
                           workspace: Optional[Workspace] = None) -> torch.Tensor:
    """scaled_dot_product_attention, chunked over batch, heads and queries so that the additive bias is never built
    whole (see _chunking); with a workspace every chunk's bias reuses one buffer."""
    B, nh = inp.batch, inp.heads
    Nq, hd = inp.q.shape[1:]
    Nk = inp.k.shape[1]
    q, k, v = (t.view(B, nh, -1, t.shape[-1]) for t in (inp.q, inp.k, inp.v))
    out = inp.q.new_empty(B, Nq, nh * hd) if out is None else out
    out4 = out.view(B, Nq, nh, hd)
    if inp.rel_h is None:
        out4.copy_(F.scaled_dot_product_attention(q, k, v, scale=inp.scale).transpose(1, 2))
        return out
    rel_h, rel_w = _bias_views(inp)
    Hk, Wk = inp.key_hw
    for b0, b1, h0, h1, i0, i1 in _chunks(B, nh, Nq, Nk, q.device):
        if workspace is None:
            bias = rel_h[b0:b1, h0:h1, i0:i1] + rel_w[b0:b1, h0:h1, i0:i1]  # (b, h, queries, Hk, Wk)
        else:
            bias = workspace.get("bias", (b1 - b0, h1 - h0, i1 - i0, Hk, Wk), q.dtype, q.device)
            torch.add(rel_h[b0:b1, h0:h1, i0:i1], rel_w[b0:b1, h0:h1, i0:i1], out=bias)
        o = F.scaled_dot_product_attention(q[b0:b1, h0:h1, i0:i1], k[b0:b1, h0:h1], v[b0:b1, h0:h1],
                                           attn_mask=bias.flatten(3), scale=inp.scale)
        out4[b0:b1, i0:i1, h0:h1].copy_(o.transpose(1, 2))
    return out


@register_kernel("matmul_blocked", devices=("cpu",), priority=20)
def matmul_blocked_attention(inp: AttnInputs, out: Optional[torch.Tensor] = None,
                             workspace: Optional[Workspace] = None) -> torch.Tensor:
    """The official arithmetic in cache-sized blocks: per chunk, the bias written into the score buffer, the
    scores GEMM added onto it (baddbmm, scale as its alpha), softmax in place, the GEMM with v into the output.
    Scores are in q's dtype (bfloat16 for a bfloat16 model, as the official code under autocast)."""
    B, nh = inp.batch, inp.heads
    Nq, hd = inp.q.shape[1:]
    Nk = inp.k.shape[1]
    dt, dev = inp.q.dtype, inp.q.device
    q, k, v = (t.view(B, nh, -1, t.shape[-1]) for t in (inp.q, inp.k, inp.v))
    out = inp.q.new_empty(B, Nq, nh * hd) if out is None else out
    out4 = out.view(B, Nq, nh, hd)
    rel_h, rel_w = _bias_views(inp) if inp.rel_h is not None else (None, None)
    Hk, Wk = inp.key_hw
    for b0, b1, h0, h1, i0, i1 in _chunks(B, nh, Nq, Nk, dev):
        nb, nhc, nq = b1 - b0, h1 - h0, i1 - i0
        qc = q[b0:b1, h0:h1, i0:i1].flatten(0, 1)
        kt = k[b0:b1, h0:h1].flatten(0, 1).transpose(1, 2)
        vc = v[b0:b1, h0:h1].flatten(0, 1)
        if workspace is not None:
            scores = workspace.get("scores", (nb * nhc, nq, Nk), dt, dev)
            if rel_h is None:
                torch.baddbmm(scores, qc, kt, beta=0, alpha=inp.scale, out=scores)
            else:
                torch.add(rel_h[b0:b1, h0:h1, i0:i1], rel_w[b0:b1, h0:h1, i0:i1],
                          out=scores.view(nb, nhc, nq, Hk, Wk))
                scores.baddbmm_(qc, kt, alpha=inp.scale)
            softmax_(scores)
            o = torch.bmm(scores, vc, out=workspace.get("chunk_out", (nb * nhc, nq, hd), dt, dev))
        else:
            if rel_h is None:
                scores = torch.bmm(qc, kt) * inp.scale
            else:
                bias = (rel_h[b0:b1, h0:h1, i0:i1] + rel_w[b0:b1, h0:h1, i0:i1]).reshape(nb * nhc, nq, Nk)
                scores = torch.baddbmm(bias, qc, kt, alpha=inp.scale)
            o = torch.bmm(scores.softmax(-1), vc)
        out4[b0:b1, i0:i1, h0:h1].copy_(o.view(nb, nhc, nq, hd).transpose(1, 2))
    return out


def _chunks(B: int, nh: int, Nq: int, Nk: int, device: torch.device) -> Iterator[Tuple[int, ...]]:
    """(b0, b1, h0, h1, i0, i1) chunks of batch items, heads and queries (see _chunking)."""
    on_cpu = device.type == "cpu"
    budget = MASK_CHUNK_ELEMS + (max(0, torch.get_num_threads() - 4) << 21) if on_cpu else MASK_CHUNK_ELEMS_CUDA
    nb, nhc, n_query_chunks = _chunking(B, nh, Nq, 1, Nk, budget, MIN_CHUNK_QUERIES)
    bounds = [Nq * i // n_query_chunks for i in range(n_query_chunks + 1)]
    for b0 in range(0, B, nb):
        for h0 in range(0, nh, nhc):
            for i0, i1 in zip(bounds[:-1], bounds[1:]):
                yield b0, min(B, b0 + nb), h0, min(nh, h0 + nhc), i0, i1


def _chunking(batch: int, heads: int, rows: int, row_len: int, n_keys: int, max_elems: int,
              min_queries: int = 768) -> Tuple[int, int, int]:
    """(batch items per chunk, heads per chunk, number of query-row chunks): about max_elems bias entries per
    chunk at most (rows of row_len queries are spread evenly over the chunks, up to 2x over), but at least
    min_queries queries per call where there are that many: PyTorch's CPU flash kernel uses 256-query blocks from
    768 queries on and 32/64-query blocks below, which run slower."""
    per_row = row_len * n_keys  # bias entries of one head and one row of queries
    rmin = min(rows, -(-min_queries // row_len))
    if heads * rows * per_row <= max_elems:
        return max(1, max_elems // (heads * rows * per_row)), heads, 1
    if heads * rmin * per_row <= max_elems:
        return 1, heads, rows // (max_elems // (heads * per_row))
    nh = max(1, max_elems // (rmin * per_row))
    return 1, nh, rows // max(rmin, max_elems // (nh * per_row))


@register_kernel("memeff", autograd=True, devices=("cpu",), priority=15)
def memeff_attention_kernel(inp: AttnInputs) -> torch.Tensor:
    """The memory-efficient autograd kernel: backward recomputes the probabilities chunk by chunk, so training
    keeps O(queries) per head instead of the (queries x keys) probability matrix (attention_memeff)."""
    return memeff_attention(inp.q, inp.k, inp.v, inp.rel_h, inp.rel_w, inp.scale, hw=inp.key_hw)


@register_kernel("flex", devices=("cuda", "cpu"))
def flex_attention_kernel(inp: AttnInputs) -> torch.Tensor:
    """FlexAttention with the rel-pos bias as a score_mod (flex_attention; compiled on CUDA, eager on the CPU, where
    it has no backward: declared without autograd, though on CUDA it is differentiable when named)."""
    return flex_rel_attention(inp.q, inp.k, inp.v, inp.rel_h, inp.rel_w, inp.scale)
