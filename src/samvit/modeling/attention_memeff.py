"""Memory-efficient attention with decomposed relative-position bias, for training: a torch.autograd.Function whose
forward keeps only q, k, v, the output, the small bias tables and one log-sum-exp per query, and whose backward
recomputes the probabilities chunk by chunk of query rows (the flash-attention recipe: Dao et al. 2022, algorithm 2).

    out = softmax(q k^T * scale + bias) v,   bias[i, kh * Wk + kw] = rel_h[i, kh] + rel_w[i, kw]

Under autograd, SDPA with the bias as a float mask (or the plain official arithmetic) keeps a (Nq, Nk) probability
matrix per head for the backward: for SAM's global attention at 1024 that is 4096 x 4096 floats per head and image.
Here the backward holds one chunk of it at a time. On CPU, and the reference for a GPU kernel.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

# Score entries per chunk (query rows x keys x batch*heads): 4 Mi float32 = 16 MiB, cache-sized, as the inference
# kernels' bias chunks (modeling/attention.py).
CHUNK_ELEMS = 1 << 22


def _rows_per_chunk(bh: int, nk: int, chunk_rows: Optional[int]) -> int:
    return chunk_rows if chunk_rows else max(1, CHUNK_ELEMS // max(1, bh * nk))


def _scores(q: torch.Tensor, k: torch.Tensor, rel_h: Optional[torch.Tensor], rel_w: Optional[torch.Tensor],
            scale: float, i0: int, i1: int, hk: int, wk: int) -> torch.Tensor:
    """float32 scores (BH, rows, Nk) of query rows i0:i1: q.k * scale + rel_h + rel_w."""
    bh, nk = k.shape[0], k.shape[1]
    s = torch.bmm(q[:, i0:i1], k.transpose(1, 2)).float().mul_(scale)  # the GEMM in q's dtype (bf16 on AMX)
    if rel_h is not None or rel_w is not None:
        s4 = s.view(bh, i1 - i0, hk, wk)
        if rel_h is not None:
            s4.add_(rel_h[:, i0:i1, :, None].float())
        if rel_w is not None:
            s4.add_(rel_w[:, i0:i1, None, :].float())
    return s


class MemEffAttention(torch.autograd.Function):
    """softmax(q.k^T * scale + rel_h + rel_w) v; see the module docstring. Inputs (BH, Nq, d), (BH, Nk, d) x 2,
    (BH, Nq, Hk) or None, (BH, Nq, Wk) or None; Hk, Wk the key grid."""

    @staticmethod
    def forward(ctx, *args):
        with torch.autocast(args[0].device.type, enabled=False):  # the dtypes as given, also under autocast
            return MemEffAttention._forward(ctx, *args)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        with torch.autocast(grad_out.device.type, enabled=False):
            return MemEffAttention._backward(ctx, grad_out)

    @staticmethod
    def _forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_h: Optional[torch.Tensor],
                rel_w: Optional[torch.Tensor], scale: float, hw: Tuple[int, int], chunk_rows: Optional[int]
                ) -> torch.Tensor:
        bh, nq, _ = q.shape
        nk = k.shape[1]
        hk, wk = hw
        out = torch.empty(bh, nq, v.shape[2], dtype=v.dtype, device=v.device)
        lse = torch.empty(bh, nq, dtype=torch.float32, device=q.device)
        step = _rows_per_chunk(bh, nk, chunk_rows)
        for i0 in range(0, nq, step):
            i1 = min(nq, i0 + step)
            s = _scores(q, k, rel_h, rel_w, scale, i0, i1, hk, wk)
            m = torch.logsumexp(s, -1)
            lse[:, i0:i1] = m
            p = s.sub_(m[..., None]).exp_()
            torch.bmm(p.to(v.dtype), v, out=out[:, i0:i1])
        ctx.save_for_backward(q, k, v, rel_h, rel_w, out, lse)
        ctx.scale, ctx.hw, ctx.step = scale, (hk, wk), step
        return out

    @staticmethod
    def _backward(ctx, grad_out: torch.Tensor):
        q, k, v, rel_h, rel_w, out, lse = ctx.saved_tensors
        scale, (hk, wk), step = ctx.scale, ctx.hw, ctx.step
        need_q, need_k, need_v, need_h, need_w = ctx.needs_input_grad[:5]
        bh, nq, _ = q.shape
        nk = k.shape[1]
        dt = q.dtype
        grad_out = grad_out.contiguous()
        delta = (grad_out.float() * out.float()).sum(-1)  # (BH, Nq): rowsum(dO * O) = rowsum(P * dP)
        dq = torch.empty_like(q) if need_q else None
        dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device) if need_k else None
        dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device) if need_v else None
        dh = torch.empty(bh, nq, hk, dtype=torch.float32, device=q.device) if need_h else None
        dw = torch.empty(bh, nq, wk, dtype=torch.float32, device=q.device) if need_w else None
        for i0 in range(0, nq, step):
            i1 = min(nq, i0 + step)
            p = _scores(q, k, rel_h, rel_w, scale, i0, i1, hk, wk).sub_(lse[:, i0:i1, None]).exp_()  # (BH,r,Nk)
            go = grad_out[:, i0:i1]
            if need_v:
                dv += torch.bmm(p.to(dt).transpose(1, 2), go).float()
            ds = torch.bmm(go, v.transpose(1, 2)).float()  # dP
            ds.sub_(delta[:, i0:i1, None]).mul_(p)  # dS = P * (dP - delta)
            del p
            if need_h or need_w:
                ds4 = ds.view(bh, i1 - i0, hk, wk)
                if need_h:
                    dh[:, i0:i1] = ds4.sum(3)
                if need_w:
                    dw[:, i0:i1] = ds4.sum(2)
            ds_lo = ds.to(dt)
            if need_q:
                torch.bmm(ds_lo, k, out=dq[:, i0:i1])
            if need_k:
                dk += torch.bmm(ds_lo.transpose(1, 2), q[:, i0:i1]).float()
        if need_q:
            dq.mul_(scale)
        if need_k:
            dk = dk.mul_(scale).to(k.dtype)
        return (dq, dk, dv.to(v.dtype) if need_v else None, dh.to(rel_h.dtype) if need_h else None,
                dw.to(rel_w.dtype) if need_w else None, None, None, None)


def memeff_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_h: Optional[torch.Tensor],
                     rel_w: Optional[torch.Tensor], scale: float, hw: Optional[Tuple[int, int]] = None,
                     chunk_rows: Optional[int] = None) -> torch.Tensor:
    """softmax(q.k^T * scale + bias) v with bias[i, kh*Wk + kw] = rel_h[.., i, kh] + rel_w[.., i, kw], saving for
    backward only the inputs, the output and a log-sum-exp per query. q (BH, Nq, d), k and v (BH, Nk, d), rel_h
    (BH, Nq, Hk) or None, rel_w (BH, Nq, Wk) or None; hw = (Hk, Wk) of the keys (read from rel_h / rel_w when
    given; needed when both are None only if Nk is not their product). Returns (BH, Nq, d)."""
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"memeff_attention: q, k, v must be (BH, N, d); got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    bh, nq, d = q.shape
    nk = k.shape[1]
    if k.shape != (bh, nk, d) or v.shape[:2] != (bh, nk):
        raise ValueError(f"memeff_attention: k {tuple(k.shape)} and v {tuple(v.shape)} do not fit q {tuple(q.shape)}")
    hk = rel_h.shape[-1] if rel_h is not None else None
    wk = rel_w.shape[-1] if rel_w is not None else None
    if hk is None or wk is None:
        if hw is not None:
            hk, wk = hw
        else:
            hk, wk = (hk, nk // hk) if hk else ((nk // wk, wk) if wk else (1, nk))
    if hk * wk != nk:
        raise ValueError(f"memeff_attention: the key grid {hk}x{wk} does not hold the {nk} keys")
    for name, t, n in (("rel_h", rel_h, hk), ("rel_w", rel_w, wk)):
        if t is not None and t.shape != (bh, nq, n):
            raise ValueError(f"memeff_attention: {name} must be {(bh, nq, n)}, got {tuple(t.shape)}")
    k, v = k.to(q.dtype), v.to(q.dtype)
    return MemEffAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), rel_h, rel_w, float(scale),
                                 (hk, wk), chunk_rows)
