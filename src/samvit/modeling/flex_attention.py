"""Decomposed relative-position attention with PyTorch's FlexAttention (a score_mod reads the two bias terms).

softmax(q.k * scale + rel_h[i, kh] + rel_w[i, kw]) v for key (kh, kw) of an Hk x Wk grid: the official
segment-anything arithmetic without ever building the (Nq, Nk) bias or score matrix when compiled. No block mask:
every query sees every key. Meant for GPUs (compiled to one Triton kernel); on CPU it runs eager (unfused, for
correctness checks) or compiled (inductor's CPU template; slower than samvit's blocked kernel, docs/speed.md).
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
from ..errors import ParameterError

_COMPILED: Dict[str, Callable] = {}


def flex_available() -> bool:
    """Whether this torch has torch.nn.attention.flex_attention (2.5 and later)."""
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def _flex(compiled: bool) -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    if not compiled:
        return flex_attention
    if "fn" not in _COMPILED:  # one compiled callable per process; it recompiles per shape (window / global)
        _COMPILED["fn"] = torch.compile(flex_attention, dynamic=False)
    return _COMPILED["fn"]


def flex_rel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_h: Optional[torch.Tensor] = None,
                       rel_w: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                       compiled: Optional[bool] = None) -> torch.Tensor:
    """softmax(q.k*scale + rel_h + rel_w) v by FlexAttention; q (BH, Nq, d) or (B, heads, Nq, d), k and v the
    same leading dims with Nk = Hk*Wk keys, rel_h (.., Nq, Hk) and rel_w (.., Nq, Wk) or None; out like q.

    The bias of query i and key (kh, kw) = kh*Wk + kw is rel_h[.., i, kh] + rel_w[.., i, kw], added to the scaled
    score in the kernel's score dtype (float32 for bfloat16 inputs on GPU). `scale` defaults to d**-0.5.
    `compiled`: torch.compile the kernel (default: on CUDA yes, on CPU no). Autograd on CUDA only (FlexAttention
    has no CPU backward: NotImplementedError).
    """
    if not flex_available():
        raise RuntimeError(f"flex_rel_attention needs torch.nn.attention.flex_attention (torch >= 2.5); "
                           f"this is torch {torch.__version__}")
    if q.dim() not in (3, 4) or k.dim() != q.dim() or v.dim() != q.dim():
        raise ParameterError(f"flex_rel_attention: q, k, v must all be (BH, N, d) or (B, heads, N, d); got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    lead, nq, nk = q.shape[:-2], q.shape[-2], k.shape[-2]
    if k.shape[:-2] != lead or v.shape[:-2] != lead or v.shape[-2] != nk or k.shape[-1] != q.shape[-1]:
        raise ParameterError(f"flex_rel_attention: k and v must match q's leading dims and each other; got q "
                         f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    hk = rel_h.shape[-1] if rel_h is not None else None
    wk = rel_w.shape[-1] if rel_w is not None else None
    if hk is None and wk is not None:
        hk = nk // wk
    if wk is None and hk is not None:
        wk = nk // hk
    if hk is not None and hk * wk != nk:
        raise ParameterError(f"flex_rel_attention: the key grid rel_h/rel_w give ({hk} x {wk}) does not hold "
                         f"Nk = {nk} keys")
    for name, t, n in (("rel_h", rel_h, hk), ("rel_w", rel_w, wk)):
        if t is not None and tuple(t.shape) != (*lead, nq, n):
            raise ParameterError(f"flex_rel_attention: {name} must be {(*lead, nq, n)} (q's leading dims, Nq, "
                             f"{'Hk' if name == 'rel_h' else 'Wk'}); got {tuple(t.shape)}")
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, rel_h, rel_w))
    if needs_grad and q.device.type == "cpu":
        raise NotImplementedError("flex_rel_attention: FlexAttention has no backward on CPU (torch "
                                  f"{torch.__version__}); train with another kernel there, or on CUDA")
    if q.dim() == 3:  # (BH, N, d) -> (1, BH, N, d): flex_attention takes (B, heads, N, d)
        q, k, v = q[None], k[None], v[None]
        rel_h = rel_h[None] if rel_h is not None else None
        rel_w = rel_w[None] if rel_w is not None else None

    if rel_h is None and rel_w is None:
        score_mod = None
    elif rel_w is None:
        def score_mod(score, b, h, q_idx, kv_idx):
            return score + rel_h[b, h, q_idx, kv_idx // wk]
    elif rel_h is None:
        def score_mod(score, b, h, q_idx, kv_idx):
            return score + rel_w[b, h, q_idx, kv_idx % wk]
    else:
        def score_mod(score, b, h, q_idx, kv_idx):
            return score + rel_h[b, h, q_idx, kv_idx // wk] + rel_w[b, h, q_idx, kv_idx % wk]

    if compiled is None:
        compiled = q.device.type == "cuda"
    out = _flex(compiled)(q, k, v, score_mod=score_mod, scale=scale)
    return out[0] if len(lead) == 1 else out
