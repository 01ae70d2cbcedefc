"""One pass for the bias and the softmax of decomposed rel-pos attention (a prototype for the blocked kernel).

The blocked kernel writes the summed bias into the score buffer, adds the scores GEMM onto it (baddbmm, beta=1)
and runs softmax in place: the (rows x keys) chunk is written three times and read three times, in bfloat16 for a
bfloat16 model. bias_softmax takes the plain scores GEMM's output (float32 or bfloat16) and the two small bias
terms and writes softmax(scores*scale + rel_h + rel_w) into `out` in one fused kernel (torch.compile, inductor's
CPU C++ codegen), accumulating in float32 whatever the dtypes. Eager fallback: the same arithmetic unfused.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
from ..errors import ParameterError

_COMPILED: Dict[str, Callable] = {}


def _bias_softmax_into(scores: torch.Tensor, rel_h: torch.Tensor, rel_w: torch.Tensor, out: torch.Tensor,
                       scale: float) -> None:
    G, Nq, Hk = rel_h.shape
    Wk = rel_w.shape[-1]
    s = scores.float().view(G, Nq, Hk, Wk) * scale + rel_h.float()[..., None] + rel_w.float()[..., None, :]
    out.copy_(torch.softmax(s.view(G, Nq, Hk * Wk), dim=-1))


def bias_softmax(scores: torch.Tensor, rel_h: torch.Tensor, rel_w: torch.Tensor, scale: float = 1.0,
                 out: Optional[torch.Tensor] = None, compiled: bool = True) -> torch.Tensor:
    """softmax(scores*scale + rel_h[.., i, kh] + rel_w[.., i, kw]) over keys (kh, kw) = kh*Wk + kw, in float32,
    written into `out` (default: a new tensor in scores' dtype). scores (G, Nq, Hk*Wk), rel_h (G, Nq, Hk), rel_w
    (G, Nq, Wk); out may be scores itself (in place). `compiled`: one fused inductor kernel (else eager)."""
    if scores.dim() != 3 or rel_h.dim() != 3 or rel_w.dim() != 3:
        raise ParameterError(f"bias_softmax: scores, rel_h, rel_w must be 3-D (G, Nq, ...); got {tuple(scores.shape)}, "
                         f"{tuple(rel_h.shape)}, {tuple(rel_w.shape)}")
    G, Nq, N = scores.shape
    if rel_h.shape[:2] != (G, Nq) or rel_w.shape[:2] != (G, Nq) or rel_h.shape[2] * rel_w.shape[2] != N:
        raise ParameterError(f"bias_softmax: rel_h (G, Nq, Hk) and rel_w (G, Nq, Wk) with Hk*Wk = {N} keys expected "
                         f"for scores {tuple(scores.shape)}; got {tuple(rel_h.shape)}, {tuple(rel_w.shape)}")
    out = torch.empty_like(scores) if out is None else out
    if out.shape != scores.shape:
        raise ParameterError(f"bias_softmax: out must be {tuple(scores.shape)}, got {tuple(out.shape)}")
    if not compiled:
        _bias_softmax_into(scores, rel_h, rel_w, out, float(scale))
        return out
    if "fn" not in _COMPILED:
        _COMPILED["fn"] = torch.compile(_bias_softmax_into, dynamic=False, fullgraph=True)
    if out.data_ptr() == scores.data_ptr():
        # in place: inductor (torch 2.14) fails on a kernel that reads and writes one buffer across the softmax's
        # passes (KeyError in loop_body), so the compiled path writes a new buffer and copies it back (one pass more)
        tmp = torch.empty_like(out)
        _COMPILED["fn"](scores, rel_h, rel_w, tmp, float(scale))
        return out.copy_(tmp)
    _COMPILED["fn"](scores, rel_h, rel_w, out, float(scale))
    return out
